package api

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Size units. banger speaks binary units, as Lima and Multipass do: "1G" and
// "1GiB" both mean 2^30 bytes.
const (
	KiB int64 = 1 << (10 * (iota + 1))
	MiB
	GiB
	TiB
)

// ParseSize parses "512MiB", "1G", "8GiB", "1048576" (bytes). It refuses
// decimal SI suffixes ("1GB") rather than guess which the user meant.
func ParseSize(s string) (int64, error) {
	orig := s
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, errors.New("empty size")
	}
	i := 0
	for i < len(s) && (s[i] >= '0' && s[i] <= '9') {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q: must start with a number", orig)
	}
	n, err := strconv.ParseInt(s[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", orig, err)
	}
	var mult int64
	switch strings.TrimSpace(s[i:]) {
	case "", "B":
		mult = 1
	case "K", "KiB":
		mult = KiB
	case "M", "MiB":
		mult = MiB
	case "G", "GiB":
		mult = GiB
	case "T", "TiB":
		mult = TiB
	default:
		return 0, fmt.Errorf("size %q: unknown unit %q (use K, M, G, T or KiB, MiB, GiB, TiB)", orig, s[i:])
	}
	if n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q is too large", orig)
	}
	return n * mult, nil
}

// FormatSize renders bytes in the largest binary unit that divides it
// exactly, else with one decimal: "1GiB", "512MiB", "1.5GiB".
func FormatSize(n int64) string {
	units := []struct {
		v    int64
		name string
	}{{TiB, "TiB"}, {GiB, "GiB"}, {MiB, "MiB"}, {KiB, "KiB"}}
	for _, u := range units {
		if n >= u.v {
			if n%u.v == 0 {
				return strconv.FormatInt(n/u.v, 10) + u.name
			}
			return strconv.FormatFloat(float64(n)/float64(u.v), 'f', 1, 64) + u.name
		}
	}
	return strconv.FormatInt(n, 10) + "B"
}
