package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	"github.com/bangerhq/banger/internal/api"
)

// decode reads a JSON request body strictly: JSON content type, at most
// api.MaxRequestBody bytes, no unknown fields, exactly one value.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			return api.Errorf(api.CodeUnsupportedMedia, "content type %q is not application/json", ct)
		}
	}
	return decodeBody(http.MaxBytesReader(w, r.Body, api.MaxRequestBody), v)
}

// decodeBody is decode without the HTTP parts, for the fuzz target.
func decodeBody(body io.Reader, v any) error {
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return decodeError(err)
	}
	if err := dec.Decode(&struct{}{}); !errors.Is(err, io.EOF) {
		if err == nil {
			return api.Errorf(api.CodeInvalidJSON, "request body holds more than one JSON value")
		}
		return decodeError(err)
	}
	return nil
}

func decodeError(err error) *api.Error {
	var maxErr *http.MaxBytesError
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &maxErr):
		return api.Errorf(api.CodePayloadTooLarge, "request body is larger than %d bytes", maxErr.Limit)
	case errors.Is(err, io.EOF):
		return api.Errorf(api.CodeInvalidJSON, "request body is empty")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return api.Errorf(api.CodeInvalidJSON, "request body is truncated JSON")
	case errors.As(err, &syn):
		return api.Errorf(api.CodeInvalidJSON, "request body is not valid JSON at byte %d: %v", syn.Offset, err)
	case errors.As(err, &typ):
		return api.Errorf(api.CodeInvalidJSON, "field %q must be %s, not %s", typ.Field, typ.Type, typ.Value)
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return api.Errorf(api.CodeUnknownField, "request body has unknown field %s", strings.TrimPrefix(err.Error(), "json: unknown field "))
	default:
		return api.Errorf(api.CodeInvalidJSON, "%s", fmt.Sprint(err))
	}
}
