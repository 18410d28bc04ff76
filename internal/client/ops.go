package client

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"

	"github.com/bangerhq/banger/internal/api"
)

// streamOp calls an endpoint that answers with an NDJSON stream of
// api.StreamMessage: progress events go to progress (may be nil), and the
// final line's result is decoded into result, or its error returned.
func (c *Client) streamOp(ctx context.Context, method, path string, body any, progress func(api.Event), result any) error {
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var msg struct {
			Event  *api.Event      `json:"event"`
			Result json.RawMessage `json:"result"`
			Error  *api.Error      `json:"error"`
		}
		if err := json.Unmarshal(sc.Bytes(), &msg); err != nil {
			return fmt.Errorf("%s %s: decode stream: %w", method, path, err)
		}
		switch {
		case msg.Error != nil:
			return msg.Error
		case msg.Result != nil:
			if result == nil {
				return nil
			}
			if err := json.Unmarshal(msg.Result, result); err != nil {
				return fmt.Errorf("%s %s: decode result: %w", method, path, err)
			}
			return nil
		case msg.Event != nil && progress != nil:
			progress(*msg.Event)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	return fmt.Errorf("%s %s: the daemon closed the stream without a result (it may have stopped)", method, path)
}

func vmPath(name string, rest ...string) string {
	p := "/v1/vms/" + url.PathEscape(name)
	for _, r := range rest {
		p += "/" + r
	}
	return p
}

// CreateVM creates (and by default boots) a VM, reporting progress.
func (c *Client) CreateVM(ctx context.Context, req api.VMCreateRequest, progress func(api.Event)) (api.VM, error) {
	var v api.VM
	return v, c.streamOp(ctx, http.MethodPost, "/v1/vms", req, progress, &v)
}

// GetVM returns one VM.
func (c *Client) GetVM(ctx context.Context, name string) (api.VM, error) {
	var v api.VM
	return v, c.send(ctx, http.MethodGet, vmPath(name), nil, &v)
}

// StartVM boots a stopped VM.
func (c *Client) StartVM(ctx context.Context, name string, noWait bool, progress func(api.Event)) (api.VM, error) {
	var v api.VM
	return v, c.streamOp(ctx, http.MethodPost, vmPath(name, "start"), api.VMStartRequest{NoWait: noWait}, progress, &v)
}

// RestartVM stops and starts a VM.
func (c *Client) RestartVM(ctx context.Context, name string, noWait bool, progress func(api.Event)) (api.VM, error) {
	var v api.VM
	return v, c.streamOp(ctx, http.MethodPost, vmPath(name, "restart"), api.VMStartRequest{NoWait: noWait}, progress, &v)
}

// StopVM stops a VM.
func (c *Client) StopVM(ctx context.Context, name string, req api.VMStopRequest) (api.VM, error) {
	var v api.VM
	return v, c.send(ctx, http.MethodPost, vmPath(name, "stop"), req, &v)
}

// KillVM kills a VM's VMM.
func (c *Client) KillVM(ctx context.Context, name string) (api.VM, error) {
	var v api.VM
	return v, c.send(ctx, http.MethodPost, vmPath(name, "kill"), struct{}{}, &v)
}

// DeleteVM deletes a VM; force also kills a running one.
func (c *Client) DeleteVM(ctx context.Context, name string, force bool) error {
	return c.send(ctx, http.MethodDelete, vmPath(name)+"?force="+strconv.FormatBool(force), nil, nil)
}

// VMSSH returns how to reach a running VM over SSH.
func (c *Client) VMSSH(ctx context.Context, name string) (api.SSHInfo, error) {
	var info api.SSHInfo
	return info, c.send(ctx, http.MethodGet, vmPath(name, "ssh"), nil, &info)
}

// Console streams a VM's console log: the last tail bytes (0: all) and,
// with follow, what comes after until ctx ends. The caller closes it.
func (c *Client) Console(ctx context.Context, name string, tail int64, follow bool) (io.ReadCloser, error) {
	q := url.Values{}
	if tail > 0 {
		q.Set("tail", strconv.FormatInt(tail, 10))
	}
	if follow {
		q.Set("follow", "true")
	}
	resp, err := c.do(ctx, http.MethodGet, vmPath(name, "console")+"?"+q.Encode(), nil)
	if err != nil {
		return nil, err
	}
	return resp.Body, nil
}

func imagePath(name string) string { return "/v1/images/" + url.PathEscape(name) }

// BuildImage builds an image, reporting progress.
func (c *Client) BuildImage(ctx context.Context, req api.ImageBuildRequest, progress func(api.Event)) (api.Image, error) {
	var im api.Image
	return im, c.streamOp(ctx, http.MethodPost, "/v1/images/build", req, progress, &im)
}

// ImportImage imports an image from files on the daemon's host.
func (c *Client) ImportImage(ctx context.Context, req api.ImageImportRequest, progress func(api.Event)) (api.Image, error) {
	var im api.Image
	return im, c.streamOp(ctx, http.MethodPost, "/v1/images/import", req, progress, &im)
}

// GetImage returns one image.
func (c *Client) GetImage(ctx context.Context, name string) (api.Image, error) {
	var im api.Image
	return im, c.send(ctx, http.MethodGet, imagePath(name), nil, &im)
}

// DeleteImage deletes an image no VM uses.
func (c *Client) DeleteImage(ctx context.Context, name string) error {
	return c.send(ctx, http.MethodDelete, imagePath(name), nil, nil)
}
