package api

import "testing"

// ParseSize accepts binary units with or without "iB" and refuses anything
// ambiguous or malformed.
func TestParseSize(t *testing.T) {
	good := map[string]int64{
		"1048576": 1 << 20, "512MiB": 512 << 20, "1G": 1 << 30, "8GiB": 8 << 30,
		"2T": 2 << 40, "64K": 64 << 10, "100B": 100, " 1GiB ": 1 << 30,
	}
	for in, want := range good {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "GiB", "1GB", "1.5G", "-1G", "1 gib", "99999999999T", "1e9"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) succeeded", in)
		}
	}
}

// FormatSize is exact where it can be and round-trips through ParseSize.
func TestFormatSize(t *testing.T) {
	for n, want := range map[int64]string{1 << 30: "1GiB", 512 << 20: "512MiB", 3 << 29: "1.5GiB", 10: "10B"} {
		if got := FormatSize(n); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", n, got, want)
		}
	}
	for _, n := range []int64{1 << 30, 512 << 20, 7 << 10} {
		back, err := ParseSize(FormatSize(n))
		if err != nil || back != n {
			t.Errorf("round trip %d: %d, %v", n, back, err)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"1G", "512MiB", "", "1GB", "99999999999999999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err == nil && n < 0 {
			t.Fatalf("ParseSize(%q) = %d", s, n)
		}
	})
}
