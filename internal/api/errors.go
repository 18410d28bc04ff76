package api

import (
	"fmt"
	"net/http"
)

// Code is a stable, machine-readable error code. Codes are part of the API:
// never rename one, only add.
type Code string

const (
	CodeBadRequest         Code = "bad_request"       // malformed request (syntax)
	CodeInvalidJSON        Code = "invalid_json"      // body is not the JSON expected
	CodeUnknownField       Code = "unknown_field"     // body has a field the API does not know
	CodePayloadTooLarge    Code = "payload_too_large" // body over MaxRequestBody
	CodeUnsupportedMedia   Code = "unsupported_media_type"
	CodeInvalidArgument    Code = "invalid_argument" // well-formed but invalid value
	CodeNotFound           Code = "not_found"
	CodeAlreadyExists      Code = "already_exists"
	CodeConflict           Code = "conflict"            // state does not allow it now
	CodeFailedPrecondition Code = "failed_precondition" // host lacks something
	CodeForbidden          Code = "forbidden"
	CodeMethodNotAllowed   Code = "method_not_allowed"
	CodeUnavailable        Code = "unavailable" // daemon shutting down
	CodeCanceled           Code = "canceled"
	CodeTimeout            Code = "timeout"
	CodeInternal           Code = "internal"
)

// Error is the body of every error response ({"error": {...}}) and the Go
// error the client returns for them.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
	Hint    string `json:"hint,omitempty"`
}

// ErrorResponse wraps Error on the wire.
type ErrorResponse struct {
	Error *Error `json:"error"`
}

func (e *Error) Error() string {
	if e.Hint != "" {
		return fmt.Sprintf("%s (hint: %s)", e.Message, e.Hint)
	}
	return e.Message
}

// Errorf builds an *Error with a formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// WithHint returns a copy of e carrying hint.
func (e *Error) WithHint(hint string) *Error {
	c := *e
	c.Hint = hint
	return &c
}

// HTTPStatus maps a code to its HTTP status.
func (c Code) HTTPStatus() int {
	switch c {
	case CodeBadRequest, CodeInvalidJSON, CodeUnknownField, CodePayloadTooLarge, CodeInvalidArgument:
		return http.StatusBadRequest
	case CodeUnsupportedMedia:
		return http.StatusUnsupportedMediaType
	case CodeNotFound:
		return http.StatusNotFound
	case CodeAlreadyExists, CodeConflict:
		return http.StatusConflict
	case CodeFailedPrecondition:
		return http.StatusPreconditionFailed
	case CodeForbidden:
		return http.StatusForbidden
	case CodeMethodNotAllowed:
		return http.StatusMethodNotAllowed
	case CodeUnavailable:
		return http.StatusServiceUnavailable
	case CodeCanceled:
		return 499
	case CodeTimeout:
		return http.StatusGatewayTimeout
	default:
		return http.StatusInternalServerError
	}
}
