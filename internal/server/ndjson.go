package server

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"

	"github.com/bangerhq/banger/internal/api"
)

// ndjson writes one JSON value per line and flushes each, so clients see
// progress as it happens.
type ndjson struct {
	w   http.ResponseWriter
	rc  *http.ResponseController
	enc *json.Encoder
}

func newNDJSON(w http.ResponseWriter) *ndjson {
	return &ndjson{w: w, rc: http.NewResponseController(w), enc: json.NewEncoder(w)}
}

func (n *ndjson) start() {
	n.w.Header().Set("Content-Type", api.ContentTypeNDJSON)
	n.w.Header().Set("Cache-Control", "no-store")
	n.w.WriteHeader(http.StatusOK)
	_ = n.rc.Flush()
}

func (n *ndjson) send(v any) error {
	if err := n.enc.Encode(v); err != nil {
		return err
	}
	return n.rc.Flush()
}

// newOpID names one long operation in the event stream.
func newOpID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
