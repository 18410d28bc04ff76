package revert

import (
	"slices"
	"testing"
)

// Fail undoes in reverse order once; Success disarms it.
func TestRevert(t *testing.T) {
	var got []int
	r := New()
	r.Add(func() { got = append(got, 1) })
	r.Add(func() { got = append(got, 2) })
	r.Fail()
	r.Fail()
	if !slices.Equal(got, []int{2, 1}) {
		t.Fatalf("undo order %v, want [2 1]", got)
	}
	got = nil
	r = New()
	r.Add(func() { got = append(got, 1) })
	r.Success()
	r.Fail()
	if len(got) != 0 {
		t.Fatalf("undo ran after Success: %v", got)
	}
}
