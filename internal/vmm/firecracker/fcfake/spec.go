// Package fcfake is a stand-in for the Firecracker binary, for tests on
// machines where Firecracker's KVM guests cannot run. It is built from the
// published swagger of each supported version (spec/, copied from
// firecracker-microvm/firecracker): requests are routed by the spec's paths
// and methods and their bodies validated against its schemas, strictly, as
// Firecracker's serde(deny_unknown_fields) structs do. On top of that it
// models what the spec cannot say and the driver depends on: pre-boot and
// post-boot phases, resource id rules, files opened at PUT time, the
// vsock socket bound at PUT time, InstanceStart, pause/resume, Ctrl-Alt-Del
// ending the process with status 0, snapshots, and Firecracker's log lines.
//
// Fault messages are Firecracker's texts where its source gives them
// (parsed_request.rs, rpc_interface.rs, vmm_config/*.rs); deserialization
// messages follow serde_json's wording without its "at line L column C"
// suffix. Texts marked "approximate" in server.go were not verified.
//
// Main lets a test binary serve as the fake executable (see Main).
package fcfake

import (
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

//go:embed spec/*.yaml
var specFS embed.FS

// specFiles maps the versions the fake can impersonate to their swagger.
var specFiles = map[string]string{
	"1.14.2":     "spec/firecracker-v1.14.2.yaml",
	"1.16.1":     "spec/firecracker-v1.16.1.yaml",
	"1.17.0-dev": "spec/firecracker-head-1.17.0-dev.yaml",
}

// Versions lists the versions the fake can impersonate, oldest first.
func Versions() []string {
	vs := make([]string, 0, len(specFiles))
	for v := range specFiles {
		vs = append(vs, v)
	}
	sort.Strings(vs)
	return vs
}

// Spec is one version's API: its operations and schemas.
type Spec struct {
	Version string
	paths   []*pathItem
	defs    map[string]*Schema
}

type pathItem struct {
	template string
	segs     []string // "{drive_id}" marks a parameter
	ops      map[string]*Operation
}

// Operation is one method on one path of the spec.
type Operation struct {
	ID     string // the spec's operationId ("putGuestDriveByID")
	Method string
	Path   string // the spec's template ("/drives/{drive_id}")
	// Body is the schema of the body parameter, nil when the operation
	// takes none.
	Body *Schema
	// Responses maps the spec's status codes ("200", "204", "400",
	// "default") to their schema (nil for an empty body).
	Responses map[string]*Schema
}

// SuccessStatus is the 2xx code the spec lists for the operation.
func (op *Operation) SuccessStatus() int {
	for _, c := range []string{"204", "200"} {
		if _, ok := op.Responses[c]; ok {
			n, _ := strconv.Atoi(c)
			return n
		}
	}
	return 204
}

// Schema is the subset of Swagger 2.0 schemas the Firecracker spec uses.
type Schema struct {
	Name       string // the definition name, for references
	Ref        string
	Type       string // object, string, integer, boolean, array, number; "" for any
	Format     string
	Required   []string
	Properties []Property // in the spec's order
	Enum       []string
	Minimum    *float64
	Maximum    *float64
	Items      *Schema
	// AdditionalAny allows any extra member; Additional, when set,
	// validates them. Without either an unknown member is an error, as
	// with serde(deny_unknown_fields).
	AdditionalAny bool
	Additional    *Schema
	// FoldEnum compares enum values case-insensitively, for the few enums
	// Firecracker parses by hand (the logger level).
	FoldEnum bool

	spec *Spec
}

// Property is one member of an object schema.
type Property struct {
	Name   string
	Schema *Schema
}

// LoadSpec parses the embedded swagger of version.
func LoadSpec(version string) (*Spec, error) {
	file, ok := specFiles[version]
	if !ok {
		return nil, fmt.Errorf("load spec: no spec for firecracker %q (have %s)", version, strings.Join(Versions(), ", "))
	}
	raw, err := specFS.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("load spec %s: %w", file, err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		return nil, fmt.Errorf("parse spec %s: %w", file, err)
	}
	if len(doc.Content) != 1 {
		return nil, fmt.Errorf("parse spec %s: not a single document", file)
	}
	root := doc.Content[0]
	s := &Spec{Version: version, defs: map[string]*Schema{}}
	defs := mapGet(root, "definitions")
	for _, kv := range mapPairs(defs) {
		sch, err := s.schema(kv[1])
		if err != nil {
			return nil, fmt.Errorf("parse spec %s: definition %s: %w", file, kv[0].Value, err)
		}
		sch.Name = kv[0].Value
		s.defs[kv[0].Value] = sch
	}
	for _, kv := range mapPairs(mapGet(root, "paths")) {
		p := &pathItem{template: kv[0].Value, ops: map[string]*Operation{}}
		p.segs = strings.Split(strings.Trim(p.template, "/"), "/")
		for _, mop := range mapPairs(kv[1]) {
			method := strings.ToUpper(mop[0].Value)
			op := &Operation{ID: mapGet(mop[1], "operationId").Value, Method: method, Path: p.template, Responses: map[string]*Schema{}}
			for _, param := range seqItems(mapGet(mop[1], "parameters")) {
				if mapGet(param, "in").Value == "body" {
					if op.Body, err = s.schema(mapGet(param, "schema")); err != nil {
						return nil, fmt.Errorf("parse spec %s: %s %s body: %w", file, method, p.template, err)
					}
				}
			}
			for _, rkv := range mapPairs(mapGet(mop[1], "responses")) {
				var rs *Schema
				if sn := mapGet(rkv[1], "schema"); sn != nil {
					if rs, err = s.schema(sn); err != nil {
						return nil, fmt.Errorf("parse spec %s: %s %s response: %w", file, method, p.template, err)
					}
				}
				op.Responses[rkv[0].Value] = rs
			}
			p.ops[method] = op
		}
		s.paths = append(s.paths, p)
	}
	// "The possible values are case-insensitive" (Logger.level).
	if lvl := s.defs["Logger"].Property("level"); lvl != nil {
		lvl.FoldEnum = true
	}
	// Every reference must resolve, or validation would silently pass.
	for name, d := range s.defs {
		if err := d.checkRefs(map[*Schema]bool{}); err != nil {
			return nil, fmt.Errorf("parse spec %s: definition %s: %w", file, name, err)
		}
	}
	return s, nil
}

func (s *Spec) schema(n *yaml.Node) (*Schema, error) {
	if n == nil {
		return nil, nil
	}
	if n.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("schema at line %d is not a mapping", n.Line)
	}
	sch := &Schema{spec: s}
	for _, kv := range mapPairs(n) {
		k, v := kv[0].Value, kv[1]
		var err error
		switch k {
		case "$ref":
			sch.Ref = strings.TrimPrefix(v.Value, "#/definitions/")
		case "type":
			sch.Type = v.Value
		case "format":
			sch.Format = v.Value
		case "required":
			for _, it := range seqItems(v) {
				sch.Required = append(sch.Required, it.Value)
			}
		case "enum":
			for _, it := range seqItems(v) {
				sch.Enum = append(sch.Enum, it.Value)
			}
		case "minimum", "maximum":
			f, perr := strconv.ParseFloat(v.Value, 64)
			if perr != nil {
				return nil, fmt.Errorf("%s %q: %w", k, v.Value, perr)
			}
			if k == "minimum" {
				sch.Minimum = &f
			} else {
				sch.Maximum = &f
			}
		case "items":
			sch.Items, err = s.schema(v)
		case "properties":
			for _, pkv := range mapPairs(v) {
				ps, perr := s.schema(pkv[1])
				if perr != nil {
					return nil, fmt.Errorf("property %s: %w", pkv[0].Value, perr)
				}
				sch.Properties = append(sch.Properties, Property{Name: pkv[0].Value, Schema: ps})
			}
		case "additionalProperties":
			if v.Kind == yaml.ScalarNode {
				sch.AdditionalAny = v.Value == "true"
			} else {
				sch.Additional, err = s.schema(v)
			}
		}
		if err != nil {
			return nil, err
		}
	}
	return sch, nil
}

func (sch *Schema) checkRefs(seen map[*Schema]bool) error {
	if sch == nil || seen[sch] {
		return nil
	}
	seen[sch] = true
	if sch.Ref != "" {
		if _, ok := sch.spec.defs[sch.Ref]; !ok {
			return fmt.Errorf("unresolved $ref %q", sch.Ref)
		}
	}
	for _, p := range sch.Properties {
		if err := p.Schema.checkRefs(seen); err != nil {
			return err
		}
	}
	if err := sch.Items.checkRefs(seen); err != nil {
		return err
	}
	return sch.Additional.checkRefs(seen)
}

// resolve follows $ref; a property's $ref may carry a description beside
// it, which changes nothing.
func (sch *Schema) resolve() *Schema {
	for sch != nil && sch.Ref != "" {
		sch = sch.spec.defs[sch.Ref]
	}
	return sch
}

// Definition returns a named definition ("NetworkInterface"), or nil.
func (s *Spec) Definition(name string) *Schema { return s.defs[name] }

// Has reports whether a definition has a property: how tests compare the
// driver's capability table with the spec.
func (s *Spec) Has(def, prop string) bool {
	d := s.defs[def]
	if d == nil {
		return false
	}
	return d.Property(prop) != nil
}

// Property returns the schema of a member, or nil.
func (sch *Schema) Property(name string) *Schema {
	sch = sch.resolve()
	if sch == nil {
		return nil
	}
	for _, p := range sch.Properties {
		if p.Name == name {
			return p.Schema
		}
	}
	return nil
}

// Lookup routes a request path to the operation for method, returning the
// path parameters. ok is false when the spec has no such path and method.
func (s *Spec) Lookup(method, path string) (op *Operation, params map[string]string, ok bool) {
	segs := strings.Split(strings.Trim(path, "/"), "/")
	for _, p := range s.paths {
		if len(p.segs) != len(segs) {
			continue
		}
		params = map[string]string{}
		match := true
		for i, ts := range p.segs {
			if strings.HasPrefix(ts, "{") && strings.HasSuffix(ts, "}") {
				params[ts[1:len(ts)-1]] = segs[i]
				continue
			}
			if ts != segs[i] {
				match = false
				break
			}
		}
		if !match {
			continue
		}
		if op, ok := p.ops[method]; ok {
			return op, params, true
		}
	}
	return nil, nil, false
}

// ValidationError is a body the version's schema rejects. Msg is worded
// like serde_json's error (without position).
type ValidationError struct{ Msg string }

func (e *ValidationError) Error() string { return e.Msg }

// Validate checks a request against the spec: the path and method must
// exist and the body must satisfy the operation's schema. It is what the
// server does before any modelled behaviour, exported so tests can check
// the bodies a client would send.
func (s *Spec) Validate(method, path string, body []byte) error {
	op, _, ok := s.Lookup(method, path)
	if !ok {
		return fmt.Errorf("%s %s: not in the firecracker %s spec", method, path, s.Version)
	}
	if op.Body == nil {
		if len(body) != 0 {
			return fmt.Errorf("%s %s: takes no body", method, path)
		}
		return nil
	}
	_, err := op.Body.Decode(body)
	return err
}

// Decode parses a JSON document and validates it; the value uses
// json.Number for numbers and ordered *Object for objects.
func (sch *Schema) Decode(body []byte) (any, error) {
	return sch.decode(body, false)
}

// decode is Decode, with partial relaxing the top-level required members.
func (sch *Schema) decode(body []byte, partial bool) (any, error) {
	v, err := decodeOrdered(body)
	if err != nil {
		return nil, &ValidationError{Msg: err.Error()}
	}
	if partial {
		if obj, ok := v.(*Object); ok && sch.resolve() != nil {
			relaxed := *sch.resolve()
			relaxed.Required = nil
			return v, relaxed.validateObject(obj)
		}
	}
	if err := sch.validate(v); err != nil {
		return nil, err
	}
	return v, nil
}

// validate applies the schema to a decoded value, in document order, the
// order serde reports errors in. Missing required members are reported
// after the members present, as serde does at the end of a struct.
func (sch *Schema) validate(v any) error {
	sch = sch.resolve()
	if sch == nil {
		return nil
	}
	if v == nil {
		// serde maps null to None for an Option: optional members may be
		// null, anything else may not.
		return &ValidationError{Msg: "invalid type: null, expected " + sch.expected()}
	}
	switch sch.Type {
	case "object", "":
		if sch.Type == "" && len(sch.Properties) == 0 {
			return nil // any JSON value
		}
		obj, ok := v.(*Object)
		if !ok {
			return &ValidationError{Msg: "invalid type: " + describe(v) + ", expected " + sch.expected()}
		}
		return sch.validateObject(obj)
	case "string":
		str, ok := v.(string)
		if !ok {
			return &ValidationError{Msg: "invalid type: " + describe(v) + ", expected a string"}
		}
		if len(sch.Enum) > 0 && !slices.ContainsFunc(sch.Enum, func(e string) bool {
			return e == str || sch.FoldEnum && strings.EqualFold(e, str)
		}) {
			return &ValidationError{Msg: fmt.Sprintf("unknown variant `%s`, %s", str, oneOf(sch.Enum, "variants"))}
		}
		if sch.Format != "" {
			re, err := regexp.Compile("^(?:" + sch.Format + ")$")
			if err == nil && !re.MatchString(str) {
				return &ValidationError{Msg: fmt.Sprintf("invalid value: string %q, expected a string matching %s", str, sch.Format)}
			}
		}
	case "integer", "number":
		num, ok := v.(json.Number)
		if !ok {
			return &ValidationError{Msg: "invalid type: " + describe(v) + ", expected " + sch.expected()}
		}
		f, err := num.Float64()
		if err != nil {
			return &ValidationError{Msg: fmt.Sprintf("invalid number %s", num)}
		}
		if sch.Type == "integer" {
			if _, err := strconv.ParseInt(num.String(), 10, 64); err != nil {
				if _, uerr := strconv.ParseUint(num.String(), 10, 64); uerr != nil {
					return &ValidationError{Msg: "invalid type: floating point `" + num.String() + "`, expected " + sch.expected()}
				}
			}
		}
		lo, hi := sch.bounds()
		if f < lo || f > hi {
			return &ValidationError{Msg: fmt.Sprintf("invalid value: integer `%s`, expected %s", num, sch.expected())}
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			return &ValidationError{Msg: "invalid type: " + describe(v) + ", expected a boolean"}
		}
	case "array":
		arr, ok := v.([]any)
		if !ok {
			return &ValidationError{Msg: "invalid type: " + describe(v) + ", expected a sequence"}
		}
		for _, it := range arr {
			if err := sch.Items.validate(it); err != nil {
				return err
			}
		}
	}
	return nil
}

func (sch *Schema) validateObject(obj *Object) error {
	seen := map[string]bool{}
	for _, m := range obj.Members {
		if seen[m.Key] {
			return &ValidationError{Msg: fmt.Sprintf("duplicate field `%s`", m.Key)}
		}
		seen[m.Key] = true
		ps := sch.Property(m.Key)
		switch {
		case ps != nil:
			if m.Value == nil && !slices.Contains(sch.Required, m.Key) {
				continue
			}
			if err := ps.validate(m.Value); err != nil {
				return err
			}
		case sch.Additional != nil:
			if err := sch.Additional.validate(m.Value); err != nil {
				return err
			}
		case sch.AdditionalAny || sch.spec.allowsUnknown(sch.Name):
		default:
			names := make([]string, len(sch.Properties))
			for i, p := range sch.Properties {
				names[i] = p.Name
			}
			return &ValidationError{Msg: fmt.Sprintf("unknown field `%s`, %s", m.Key, oneOf(names, "fields"))}
		}
	}
	for _, r := range sch.Required {
		if !seen[r] {
			return &ValidationError{Msg: fmt.Sprintf("missing field `%s`", r)}
		}
	}
	return nil
}

// allowsUnknown lists the structs that lack deny_unknown_fields in a
// version (API-SUMMARY: MetricsConfig in v1.14.2).
func (s *Spec) allowsUnknown(def string) bool {
	return def == "Metrics" && s.Version == "1.14.2"
}

func (sch *Schema) bounds() (lo, hi float64) {
	lo, hi = math.Inf(-1), math.Inf(1)
	switch sch.Format {
	case "int32":
		lo, hi = math.MinInt32, math.MaxInt32
	case "int64":
		lo, hi = math.MinInt64, math.MaxInt64
	}
	if sch.Minimum != nil {
		lo = max(lo, *sch.Minimum)
	}
	if sch.Maximum != nil {
		hi = min(hi, *sch.Maximum)
	}
	return lo, hi
}

// expected names the type the way serde's messages do.
func (sch *Schema) expected() string {
	switch sch.Type {
	case "integer", "number":
		lo, hi := sch.bounds()
		switch {
		case !math.IsInf(lo, -1) && !math.IsInf(hi, 1):
			return fmt.Sprintf("an integer between %v and %v", lo, hi)
		case !math.IsInf(lo, -1):
			return fmt.Sprintf("an integer >= %v", lo)
		case !math.IsInf(hi, 1):
			return fmt.Sprintf("an integer <= %v", hi)
		}
		return "an integer"
	case "string":
		return "a string"
	case "boolean":
		return "a boolean"
	case "array":
		return "a sequence"
	}
	if sch.Name != "" {
		return "struct " + sch.Name
	}
	return "a map"
}

// oneOf words a list of alternatives like serde: "expected `a`",
// "expected `a` or `b`", "expected one of `a`, `b`, `c`".
func oneOf(names []string, what string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = "`" + n + "`"
	}
	switch len(q) {
	case 0:
		return "there are no " + what
	case 1:
		return "expected " + q[0]
	case 2:
		return "expected " + q[0] + " or " + q[1]
	}
	return "expected one of " + strings.Join(q, ", ")
}

func describe(v any) string {
	switch x := v.(type) {
	case string:
		return fmt.Sprintf("string %q", x)
	case bool:
		return fmt.Sprintf("boolean `%t`", x)
	case json.Number:
		if strings.ContainsAny(x.String(), ".eE") {
			return "floating point `" + x.String() + "`"
		}
		return "integer `" + x.String() + "`"
	case []any:
		return "sequence"
	case *Object:
		return "map"
	}
	return "null"
}

// Object is a JSON object with its members in document order.
type Object struct {
	Members []Member
}

// Member is one key and value of an Object.
type Member struct {
	Key   string
	Value any
}

// Get returns a member's value and whether it is present (and not null).
func (o *Object) Get(key string) (any, bool) {
	if o == nil {
		return nil, false
	}
	for _, m := range o.Members {
		if m.Key == key {
			return m.Value, m.Value != nil
		}
	}
	return nil, false
}

// decodeOrdered parses exactly one JSON value, keeping object member order
// and duplicates (encoding/json would keep the last duplicate silently).
func decodeOrdered(b []byte) (any, error) {
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.UseNumber()
	v, err := decodeValue(dec)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("trailing characters")
	}
	return v, nil
}

func decodeValue(dec *json.Decoder) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("EOF while parsing a value")
		}
		return nil, err
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			obj := &Object{}
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, err
				}
				key, ok := kt.(string)
				if !ok {
					return nil, errors.New("key must be a string")
				}
				val, err := decodeValue(dec)
				if err != nil {
					return nil, err
				}
				obj.Members = append(obj.Members, Member{Key: key, Value: val})
			}
			if _, err := dec.Token(); err != nil {
				return nil, err
			}
			return obj, nil
		case '[':
			arr := []any{}
			for dec.More() {
				val, err := decodeValue(dec)
				if err != nil {
					return nil, err
				}
				arr = append(arr, val)
			}
			if _, err := dec.Token(); err != nil {
				return nil, err
			}
			return arr, nil
		}
		return nil, fmt.Errorf("unexpected %q", t)
	default:
		return t, nil
	}
}

// mapGet, mapPairs and seqItems walk yaml.v3 nodes.
func mapGet(n *yaml.Node, key string) *yaml.Node {
	for _, kv := range mapPairs(n) {
		if kv[0].Value == key {
			return kv[1]
		}
	}
	return nil
}

func mapPairs(n *yaml.Node) [][2]*yaml.Node {
	if n == nil || n.Kind != yaml.MappingNode {
		return nil
	}
	out := make([][2]*yaml.Node, 0, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		out = append(out, [2]*yaml.Node{n.Content[i], n.Content[i+1]})
	}
	return out
}

func seqItems(n *yaml.Node) []*yaml.Node {
	if n == nil || n.Kind != yaml.SequenceNode {
		return nil
	}
	return n.Content
}
