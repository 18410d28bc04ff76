package server

import (
	"context"
	"net/http"
	"sync"

	"github.com/bangerhq/banger/internal/api"
)

// stream runs a long operation, sending its progress as NDJSON lines and
// then one final line with the result or the error. Progress also goes to
// the event bus, tagged with an operation id. If the client goes away the
// operation's context ends and the operation cleans up after itself.
func (s *Server) stream(w http.ResponseWriter, r *http.Request, kind, name string, op func(context.Context, Progress) (any, error)) error {
	nd := newNDJSON(w)
	nd.start()
	opID := newOpID()
	var mu sync.Mutex // serialises writes from the operation's goroutines
	progress := func(e api.Event) {
		e.Op = opID
		if e.Kind == "" {
			e.Kind = kind
		}
		if e.Name == "" {
			e.Name = name
		}
		if s.Events != nil {
			e = s.Events.Publish(e)
		}
		mu.Lock()
		defer mu.Unlock()
		_ = nd.send(api.StreamMessage{Event: &e})
	}
	res, err := op(r.Context(), progress)
	mu.Lock()
	defer mu.Unlock()
	if err != nil {
		_ = nd.send(api.StreamMessage{Error: s.toAPIError(r, err)})
		return nil
	}
	_ = nd.send(api.StreamMessage{Result: res})
	return nil
}
