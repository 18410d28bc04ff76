// Package helperapi is the protocol between bangerd (the owner user's
// daemon) and banger-helper (the narrow root helper).
//
// The helper exposes a closed set of typed operations, one struct per
// operation (EnsureBridge, CreateTap, AttachLoop …). Each has a Validate
// method that accepts only banger's own names: taps "bgr-<vm id>", bridges
// "banger<N>", VM ids of IDLength lower-case hex digits, and file names from
// a strict basename pattern that the helper resolves itself under
// <state dir>/vms/<vm id>/. No operation takes a command, a free-form path or
// a free-form firewall rule, so a compromised daemon can only do what the
// daemon could legitimately ask for. LaunchJailed, the one that starts a
// process, names none either: the binaries, the jail's place, its uid and
// its limits are the helper's choice, from its own configuration.
//
// # Wire format
//
// One request per connection over the helper's unix stream socket:
//
//  1. The client connects and writes one JSON object
//     {"op": "<op name>", "args": {...}} of at most MaxRequestSize bytes,
//     then shuts down its write side (shutdown(2) SHUT_WR) to mark the end.
//  2. The helper checks the peer's SO_PEERCRED before reading anything,
//     decodes the request strictly (DecodeRequest: unknown, duplicate or
//     mis-cased keys at any depth, trailing data and oversize requests are
//     all refused), validates it, runs it and writes one JSON response:
//     {"ok": true, "result": {...}, "fds": N} or
//     {"ok": false, "error": {"code": "...", "message": "..."}}.
//  3. When "fds" is non-zero the response's first bytes carry that many file
//     descriptors as SCM_RIGHTS ancillary data (AttachLoop, CreateSnapshot:
//     the opened block device). The helper then closes the connection.
//
// One request per connection keeps the peer check, the log line and the
// descriptor hand-over tied to one operation, at the cost of a connect per
// call, which is negligible next to what the operations do.
package helperapi
