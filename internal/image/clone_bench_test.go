package image

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerhq/banger/internal/testutil"
)

// benchTree writes the content of a benchmark image into a new directory:
// 8 MiB files of incompressible data, half the image's size in all, plus a
// few hundred small ones.
func benchTree(b *testing.B, imageSize int64) string {
	b.Helper()
	dir := b.TempDir()
	rng := rand.NewChaCha8([32]byte{byte(imageSize >> 30)})
	write := func(name string, n int64) {
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if _, err := io.Copy(f, io.LimitReader(rng, n)); err != nil {
			b.Fatal(err)
		}
	}
	for i := range imageSize / 2 / (8 << 20) {
		write(fmt.Sprintf("blob%04d", i), 8<<20)
	}
	for i := range 300 {
		write(fmt.Sprintf("small%03d", i), int64(1+i*37%4096))
	}
	return dir
}

// benchSource makes, in dir, an ext4 image of size bytes holding tree, the
// way banger builds a rootfs (mkfs.ext4 -d): a sparse file whose written
// parts are real filesystem data and metadata.
func benchSource(b *testing.B, dir, tree string, size int64) string {
	b.Helper()
	p := filepath.Join(dir, "rootfs.ext4")
	runTool(b, "mkfs.ext4", "-q", "-F", "-d", tree, p, fmt.Sprint(size>>20)+"M")
	syncFS(b, p)
	return p
}

// timeCommand runs argv runs times, removing dst after each, and returns the
// median wall time of the command.
func timeCommand(b *testing.B, runs int, dst string, argv ...string) time.Duration {
	b.Helper()
	var times []time.Duration
	for range runs {
		start := time.Now()
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			b.Fatalf("%v: %v: %s", argv, err, out)
		}
		times = append(times, time.Since(start))
		if err := os.Remove(dst); err != nil {
			b.Fatal(err)
		}
		syncFS(b, filepath.Dir(dst))
	}
	slices.Sort(times)
	return times[len(times)/2]
}

// BenchmarkClone measures making one VM disk from a 1 GiB and a 4 GiB ext4
// image, each half full of real data (benchTree, benchSource), with each
// strategy, on the filesystem it is chosen for (reflink on XFS,
// qcow2 and sparse copy on ext4, both loop-mounted), against cp measured on
// the same filesystem and source in the same run:
//
//   - x-vs-cp: cp's time (coreutils default, which reflinks on XFS) over
//     the strategy's time;
//   - x-vs-cp-copy: the same with cp --reflink=never, a real data copy;
//   - x-vs-cp-fsync: cp (default) followed by an fsync of the copy, which
//     pays for durability as every clone does;
//   - x-vs-qemu-img (qcow2 only): `qemu-img create -f qcow2 -F raw -b`, what
//     the qcow2 strategy ran before it wrote overlays itself, over its time.
//
// The filesystems sit on loop devices with direct I/O and are synced
// between runs, so no contender pays for another's writes; the source is in
// the page cache for every contender. Clones are fsynced (a disk the daemon
// records must survive a crash); plain cp's copies are not.
func BenchmarkClone(b *testing.B) {
	testutil.RequireRoot(b)
	testutil.RequireCommand(b, "cp", "qemu-img", "mkfs.ext4", "filefrag")
	for _, size := range []int64{1 << 30, 4 << 30} {
		b.Run(fmt.Sprintf("%dGiB", size>>30), func(b *testing.B) {
			fsSize := 3*size + 1<<30
			tree := benchTree(b, size)
			xfsSrc := benchSource(b, xfsReflinkFS(b, fsSize), tree, size)
			ext4Src := benchSource(b, ext4FS(b, fsSize), tree, size)
			b.Logf("source: %d-byte ext4 image, %d bytes allocated, %s", size, allocatedBytes(b, xfsSrc), strings.TrimSpace(runTool(b, "filefrag", xfsSrc)))
			runs := 3
			if size > 1<<30 {
				runs = 2
			}
			cp := map[string]time.Duration{}
			cpCopy := map[string]time.Duration{}
			cpSync := map[string]time.Duration{}
			for _, src := range []string{xfsSrc, ext4Src} {
				dst := filepath.Join(filepath.Dir(src), "cp-peer")
				cp[src] = timeCommand(b, runs, dst, "cp", src, dst)
				cpCopy[src] = timeCommand(b, runs, dst, "cp", "--reflink=never", src, dst)
				cpSync[src] = timeCommand(b, runs, dst, "sh", "-c", `cp -- "$1" "$2" && sync -- "$2"`, "sh", src, dst)
			}
			b.Logf("cp %s: XFS %v (--reflink=never %v, then fsync %v), ext4 %v (--reflink=never %v, then fsync %v)",
				filepath.Base(b.Name()), cp[xfsSrc], cpCopy[xfsSrc], cpSync[xfsSrc], cp[ext4Src], cpCopy[ext4Src], cpSync[ext4Src])
			qemuImgDst := filepath.Join(filepath.Dir(ext4Src), "qemu-img-peer")
			qemuImgCreate := timeCommand(b, 9, qemuImgDst, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", ext4Src, qemuImgDst)
			b.Logf("qemu-img create %s: ext4 %v", filepath.Base(b.Name()), qemuImgCreate)

			benches := []struct {
				cloner Cloner
				src    string
			}{
				{reflinkCloner{}, xfsSrc},
				{qcow2Cloner{qemuImg: "qemu-img"}, ext4Src},
				{sparseCopyCloner{}, ext4Src},
			}
			for _, bb := range benches {
				b.Run(string(bb.cloner.Strategy()), func(b *testing.B) {
					dst := filepath.Join(filepath.Dir(bb.src), "clone")
					var total time.Duration
					b.ResetTimer()
					for range b.N {
						start := time.Now()
						if err := bb.cloner.Clone(b.Context(), bb.src, dst); err != nil {
							b.Fatal(err)
						}
						total += time.Since(start)
						b.StopTimer()
						if err := bb.cloner.Remove(b.Context(), dst); err != nil {
							b.Fatal(err)
						}
						syncFS(b, bb.src)
						b.StartTimer()
					}
					per := float64(total) / float64(b.N)
					b.ReportMetric(per/1e6, "ms/clone")
					b.ReportMetric(float64(cp[bb.src])/per, "x-vs-cp")
					b.ReportMetric(float64(cpCopy[bb.src])/per, "x-vs-cp-copy")
					b.ReportMetric(float64(cpSync[bb.src])/per, "x-vs-cp-fsync")
					if bb.cloner.Strategy() == CloneQCOW2 {
						b.ReportMetric(float64(qemuImgCreate)/per, "x-vs-qemu-img")
					}
				})
			}
		})
	}
}
