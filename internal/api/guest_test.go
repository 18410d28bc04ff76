package api

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Frames written one after another read back in order with their types
// and payloads, including empty and maximal ones.
func TestFrameRoundTrip(t *testing.T) {
	type frame struct {
		T FrameType
		P []byte
	}
	in := []frame{
		{FrameStdin, []byte("hello")},
		{FrameStdinEOF, []byte{}},
		{FrameResize, EncodeResize(50, 132)},
		{FrameSignal, []byte("INT")},
		{FrameStdout, bytes.Repeat([]byte{0xAB}, MaxFramePayload)},
		{FrameExit, []byte(`{"code":42}`)},
	}
	var buf bytes.Buffer
	for _, f := range in {
		if err := WriteFrame(&buf, f.T, f.P); err != nil {
			t.Fatal(err)
		}
	}
	fr := NewFrameReader(&buf)
	var out []frame
	for {
		ty, p, err := fr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, frame{ty, bytes.Clone(p)})
	}
	if diff := cmp.Diff(in, out); diff != "" {
		t.Fatalf("frames (-written +read):\n%s", diff)
	}
	rows, cols, err := DecodeResize(out[2].P)
	if err != nil || rows != 50 || cols != 132 {
		t.Fatalf("resize %d×%d %v", rows, cols, err)
	}
}

// Broken streams are errors, not hangs or huge allocations: a frame cut
// short, a length over the limit, an oversized write.
func TestFrameErrors(t *testing.T) {
	cases := []struct {
		name string
		data []byte
		want error
	}{
		{"cut inside the header", []byte{5, 0, 0}, io.ErrUnexpectedEOF},
		{"cut inside the payload", []byte{5, 0, 0, 0, 4, 'a'}, io.ErrUnexpectedEOF},
		{"length over the limit", []byte{5, 0xff, 0xff, 0xff, 0xff}, ErrFrameTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := NewFrameReader(bytes.NewReader(tc.data)).Next()
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	if err := WriteFrame(io.Discard, FrameStdin, make([]byte, MaxFramePayload+1)); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("oversized write: %v", err)
	}
	if _, _, err := DecodeResize([]byte{1, 2, 3}); err == nil {
		t.Fatal("3-byte resize decoded")
	}
}

// FuzzFrameReader reads arbitrary bytes as a frame stream, as the daemon
// does with what a client sends: it must stop with an error or EOF, never
// panic, and never hand out a payload over the limit.
func FuzzFrameReader(f *testing.F) {
	var seed bytes.Buffer
	if err := WriteFrame(&seed, FrameStdin, []byte("abc")); err != nil {
		f.Fatal(err)
	}
	if err := WriteFrame(&seed, FrameResize, EncodeResize(24, 80)); err != nil {
		f.Fatal(err)
	}
	f.Add(seed.Bytes())
	f.Add([]byte{3, 0, 0, 0, 4, 0, 1, 0, 2})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := NewFrameReader(bytes.NewReader(data))
		for range len(data) + 1 {
			ty, p, err := fr.Next()
			if err != nil {
				return
			}
			if len(p) > MaxFramePayload {
				t.Fatalf("payload of %d bytes", len(p))
			}
			if ty == FrameResize {
				_, _, _ = DecodeResize(p)
			}
		}
		t.Fatal("more frames than bytes")
	})
}
