package client

import (
	"context"
	"net/http"
	"strconv"

	"github.com/bangerhq/banger/internal/api"
)

// Ports lists a VM's port forwards.
func (c *Client) Ports(ctx context.Context, name string) ([]api.PortForward, error) {
	var fs []api.PortForward
	return fs, c.send(ctx, http.MethodGet, vmPath(name, "ports"), nil, &fs)
}

// AddPort forwards 127.0.0.1:req.HostPort to the VM's req.GuestPort.
func (c *Client) AddPort(ctx context.Context, name string, req api.PortForwardRequest) (api.PortForward, error) {
	var f api.PortForward
	return f, c.send(ctx, http.MethodPost, vmPath(name, "ports"), req, &f)
}

// RemovePort removes the forward of req's protocol and host port; a
// non-zero req.GuestPort must match the recorded one.
func (c *Client) RemovePort(ctx context.Context, name string, req api.PortForwardRequest) error {
	path := vmPath(name, "ports", req.Proto, strconv.Itoa(req.HostPort))
	if req.GuestPort != 0 {
		path += "?guest_port=" + strconv.Itoa(req.GuestPort)
	}
	return c.send(ctx, http.MethodDelete, path, nil, nil)
}
