# banger — build, test and lint.
#
# `make build` stamps the version (the exact git tag, else "dev"), the full
# commit SHA and the UTC build time into both binaries.

GO            ?= go
BIN           ?= bin
PKG           := github.com/bangerhq/banger
GOLANGCI_LINT_VERSION := v2.15.0
GOBIN         ?= $(shell $(GO) env GOPATH)/bin

VERSION  ?= $(shell git describe --tags --exact-match 2>/dev/null || echo dev)
COMMIT   ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
BUILT_AT ?= $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
LDFLAGS  := -s -w \
	-X $(PKG)/internal/version.Version=$(VERSION) \
	-X $(PKG)/internal/version.Commit=$(COMMIT) \
	-X $(PKG)/internal/version.BuiltAt=$(BUILT_AT)

CMDS := banger bangerd $(if $(wildcard cmd/banger-helper),banger-helper)

.PHONY: help build test test-short lint fmt vet bench clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## build bin/banger, bin/bangerd (and bin/banger-helper) with version stamps
	@mkdir -p $(BIN)
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ $(addprefix ./cmd/,$(CMDS))

test: ## run every test (root-only and VM-booting tests skip unless their requirements are met)
	$(GO) test -count=1 -timeout 80m ./...

test-short: ## run the fast tests only
	$(GO) test -short -count=1 ./...

bench: ## run the benchmarks
	$(GO) test -run '^$$' -bench . -benchmem ./...

vet: ## go vet
	$(GO) vet ./...

lint: ## golangci-lint (installs the pinned version if missing)
	@test -x $(GOBIN)/golangci-lint && $(GOBIN)/golangci-lint version 2>/dev/null | grep -q '$(GOLANGCI_LINT_VERSION:v%=%)' || \
		GOBIN=$(GOBIN) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
	$(GOBIN)/golangci-lint run ./...

fmt: ## gofmt every Go file
	gofmt -w $$(git ls-files '*.go')

clean: ## remove build outputs
	rm -rf $(BIN)
