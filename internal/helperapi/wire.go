package helperapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"sync"
)

// Size limits. A request is a handful of short strings; a response is at
// most a ListOwned listing.
const (
	MaxRequestSize  = 4 << 10
	MaxResponseSize = 1 << 20
	// MaxFDs is the most descriptors one response carries.
	MaxFDs = 1
)

// Code is a stable error code on the wire.
type Code string

const (
	CodeInvalid     Code = "invalid_request" // malformed or refused by Validate
	CodeUnknownOp   Code = "unknown_op"      // an op this helper does not serve
	CodeForbidden   Code = "forbidden"       // the peer, or a target it may not touch
	CodeNotFound    Code = "not_found"       // a file or device that is not there
	CodeExists      Code = "exists"          // Create* of something that exists
	CodeUnsupported Code = "unsupported"     // the host lacks what the op needs
	CodeInternal    Code = "internal"        // the operation failed
)

// Error is an error reported by the helper.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string {
	if e.Message == "" {
		return string(e.Code)
	}
	return e.Message
}

// Is makes errors.Is(err, ErrNotFound) and friends match on the code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Code == e.Code
}

// Sentinels for errors.Is.
var (
	ErrInvalid     = &Error{Code: CodeInvalid}
	ErrUnknownOp   = &Error{Code: CodeUnknownOp}
	ErrForbidden   = &Error{Code: CodeForbidden}
	ErrNotFound    = &Error{Code: CodeNotFound}
	ErrExists      = &Error{Code: CodeExists}
	ErrUnsupported = &Error{Code: CodeUnsupported}
	ErrInternal    = &Error{Code: CodeInternal}
)

// Errorf builds an *Error with a code.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// request is the envelope on the wire.
type request struct {
	Op   string          `json:"op"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Response is the helper's answer.
type Response struct {
	OK     bool            `json:"ok"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *Error          `json:"error,omitempty"`
	// FDs is the number of descriptors sent with the response.
	FDs int `json:"fds,omitempty"`
}

type decoder func(args []byte) (Op, error)

// registry is the closed set of operations the helper serves.
var registry = map[string]decoder{
	OpEnsureBridge:      decodeOp[EnsureBridge],
	OpDeleteBridge:      decodeOp[DeleteBridge],
	OpCreateTap:         decodeOp[CreateTap],
	OpDeleteTap:         decodeOp[DeleteTap],
	OpEnsureNAT:         decodeOp[EnsureNAT],
	OpRemoveNAT:         decodeOp[RemoveNAT],
	OpEnsureDNSRedirect: decodeOp[EnsureDNSRedirect],
	OpAttachLoop:        decodeOp[AttachLoop],
	OpDetachLoop:        decodeOp[DetachLoop],
	OpCreateSnapshot:    decodeOp[CreateSnapshot],
	OpRemoveSnapshot:    decodeOp[RemoveSnapshot],
	OpLaunchJailed:      decodeOp[LaunchJailed],
	OpKillJailed:        decodeOp[KillJailed],
	OpListOwned:         decodeOp[ListOwned],
}

// OpNames lists the operations DecodeRequest accepts.
func OpNames() []string {
	names := make([]string, 0, len(registry))
	for n := range registry {
		names = append(names, n)
	}
	return names
}

// EncodeRequest marshals op into its wire form. It does not validate.
func EncodeRequest(op Op) ([]byte, error) {
	args, err := json.Marshal(op)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", op.OpName(), err)
	}
	b, err := json.Marshal(request{Op: op.OpName(), Args: args})
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", op.OpName(), err)
	}
	return b, nil
}

// DecodeRequest decodes and validates one request. It is strict: the data
// must be exactly one JSON object of at most MaxRequestSize bytes, keys must
// match the field names exactly (case included) and appear once, and the
// decoded op must pass Validate. Errors are *Error with CodeInvalid or
// CodeUnknownOp.
func DecodeRequest(data []byte) (Op, error) {
	if len(data) > MaxRequestSize {
		return nil, Errorf(CodeInvalid, "request of %d bytes exceeds the %d-byte limit", len(data), MaxRequestSize)
	}
	var req request
	if err := strictUnmarshal(data, &req); err != nil {
		return nil, Errorf(CodeInvalid, "decode request: %v", err)
	}
	dec, ok := registry[req.Op]
	if !ok {
		return nil, Errorf(CodeUnknownOp, "unknown op %q", req.Op)
	}
	args := []byte(req.Args)
	if len(args) == 0 || string(args) == "null" {
		args = []byte("{}")
	}
	op, err := dec(args)
	if err != nil {
		return nil, Errorf(CodeInvalid, "decode %s args: %v", req.Op, err)
	}
	if err := op.Validate(); err != nil {
		return nil, err
	}
	return op, nil
}

func decodeOp[T Op](args []byte) (Op, error) {
	var v T
	if err := strictUnmarshal(args, &v); err != nil {
		return nil, err
	}
	return v, nil
}

// strictUnmarshal decodes one JSON object into v (a pointer to a struct
// whose fields are scalars, slices of scalars, or structs and slices of
// structs made the same way), refusing keys that are unknown, duplicated
// or spelled in another case at any depth (encoding/json would accept all
// three), and trailing data.
func strictUnmarshal(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := checkStrict(dec, reflect.TypeOf(v).Elem(), true); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after the JSON object")
	}
	dec = json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

var rawMessageType = reflect.TypeFor[json.RawMessage]()

// checkStrict reads one JSON value that is to be decoded into type t.
// An object for a struct must use each field's exact name at most once;
// arrays for slices of structs are checked element by element; anything
// else is left to the decoder. Only the top-level value must be present:
// a nested struct or slice may be null.
func checkStrict(dec *json.Decoder, t reflect.Type, top bool) error {
	isStructs := t.Kind() == reflect.Slice && t != rawMessageType && t.Elem().Kind() == reflect.Struct
	if t.Kind() != reflect.Struct && !isStructs {
		var skip json.RawMessage
		return dec.Decode(&skip)
	}
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if tok == nil && !top {
		return nil
	}
	if isStructs {
		if d, ok := tok.(json.Delim); !ok || d != '[' {
			return errors.New("not a JSON array")
		}
		for dec.More() {
			if err := checkStrict(dec, t.Elem(), false); err != nil {
				return err
			}
		}
		_, err := dec.Token() // the closing ']'
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return errors.New("not a JSON object")
	}
	fields := jsonFields(t)
	seen := make(map[string]bool)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string) // object keys are always strings
		ft, ok := fields[key]
		switch {
		case !ok:
			return fmt.Errorf("unknown field %q", key)
		case seen[key]:
			return fmt.Errorf("duplicate field %q", key)
		}
		seen[key] = true
		if err := checkStrict(dec, ft, false); err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
	}
	_, err = dec.Token() // the closing '}'
	return err
}

var fieldCache sync.Map // reflect.Type → map[string]reflect.Type

// jsonFields returns the exact JSON keys of a struct type's fields, and
// each field's type.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	if m, ok := fieldCache.Load(t); ok {
		return m.(map[string]reflect.Type)
	}
	m := make(map[string]reflect.Type)
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name := f.Name
		if tag, ok := f.Tag.Lookup("json"); ok {
			if n, _, _ := strings.Cut(tag, ","); n == "-" {
				continue
			} else if n != "" {
				name = n
			}
		}
		m[name] = f.Type
	}
	fieldCache.Store(t, m)
	return m
}

// EncodeResponse marshals a successful response carrying result and fds
// descriptors, or an error response when err is non-nil. The code is that
// of the first *Error in err's chain, CodeInternal when there is none; the
// message is the whole chain's text.
func EncodeResponse(result any, fds int, err error) []byte {
	var resp Response
	if err != nil {
		code := CodeInternal
		var he *Error
		if errors.As(err, &he) {
			code = he.Code
		}
		resp = Response{Error: &Error{Code: code, Message: err.Error()}}
	} else {
		resp = Response{OK: true, FDs: fds}
		if result != nil {
			b, merr := json.Marshal(result)
			if merr != nil {
				resp = Response{Error: Errorf(CodeInternal, "encode result: %v", merr)}
			} else {
				resp.Result = b
			}
		}
	}
	b, merr := json.Marshal(resp)
	if merr != nil {
		// Response holds only strings, bools and already-valid JSON.
		panic(fmt.Sprintf("helperapi: marshal response: %v", merr))
	}
	return b
}
