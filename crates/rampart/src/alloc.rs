//! The process's allocator: mimalloc, called through its plain entry points (`mi_malloc`,
//! `mi_zalloc`, `mi_realloc`) whenever the block they return is already aligned enough,
//! and through its aligned ones only for the rare over-aligned request.
//!
//! Why not the `mimalloc` crate's `MiMalloc`: it sends every request to
//! `mi_malloc_aligned`, and mimalloc 3 serves that from its fast path only while the size
//! class's current page has a free block ready. When that list is empty it over-allocates
//! (size + alignment − 1, so from the next size class) instead of refilling the list, and
//! since later requests of the size keep missing the same empty list, a steady stream of
//! requests of one size all take the slow path (mimalloc issue 889). callgrind put about
//! ten such allocations in every request through the load balancer, at about 250
//! instructions each against about 30 on the fast path.

// The workspace's one exception to `forbid(unsafe_code)`: implementing GlobalAlloc and
// calling mimalloc's C entry points cannot be done without it. Each block says why it holds.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every block of the plain entry points has when the request is at least
/// this large: mimalloc rounds requests of more than one word to a multiple of two words
/// and starts every page's first block on a 16-byte boundary (`MI_ALIGN2W`,
/// `MI_PAGE_MIN_START_BLOCK_ALIGN` in its `page-queue.c` and `types.h`), as C's `malloc`
/// must for `max_align_t`. On 32-bit targets two words are 8 bytes, which mimalloc also
/// guarantees there.
const NATURAL_ALIGN: usize = 2 * std::mem::size_of::<usize>();

/// Whether the plain entry points satisfy `align` for a block of `size` bytes: the same
/// rule the standard library applies to the C library's `malloc` (`MIN_ALIGN`).
#[inline]
fn natural(align: usize, size: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

/// mimalloc as the global allocator; see the module's documentation.
pub struct Mimalloc;

// SAFETY: every method returns a block from mimalloc of at least the layout's size,
// aligned to the layout's alignment (by `natural`, or by the aligned entry points), or null
// on failure; `dealloc` and `realloc` only receive blocks this allocator returned, which
// `mi_free` and `mi_realloc*` accept whichever entry point made them.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: plain C calls; mimalloc accepts any size and a power-of-two alignment.
        unsafe {
            if natural(align, size) {
                mi::mi_malloc(size).cast()
            } else {
                mi::mi_malloc_aligned(size, align).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as in `alloc`.
        unsafe {
            if natural(align, size) {
                mi::mi_zalloc(size).cast()
            } else {
                mi::mi_zalloc_aligned(size, align).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (GlobalAlloc's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from this allocator with `layout` (GlobalAlloc's contract);
        // the new block keeps the layout's alignment either way.
        unsafe {
            if natural(align, new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Whether the `len` bytes at `p` are all `byte` (a slice comparison: `memcmp`, quick
    /// even in a debug build).
    ///
    /// SAFETY (caller): `p` points at `len` initialised bytes.
    unsafe fn filled(p: *const u8, len: usize, byte: u8) -> bool {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts(p, len) == vec![byte; len].as_slice() }
    }

    /// Every size up to 5 KiB and a few large ones, with every alignment from 1 to 4 KiB:
    /// the block is aligned, writable over its whole size, zeroed when asked, and keeps its
    /// bytes through growing and shrinking reallocations. Blocks are held in batches so that
    /// size classes run out of ready blocks, the case the plain path must also get right.
    #[test]
    fn blocks_are_aligned_zeroed_and_kept_through_realloc() {
        let a = Mimalloc;
        let sizes =
            (1..=5 * 1024)
                .step_by(7)
                .chain([8, 16, 24, 48, 64 * 1024, 1 << 20, (4 << 20) + 8]);
        for size in sizes {
            for shift in 0..=12 {
                let align = 1usize << shift;
                let layout = Layout::from_size_align(size, align).unwrap();
                let mut held = Vec::new();
                for i in 0..4u8 {
                    // SAFETY: non-zero size; every block is freed below with its layout.
                    unsafe {
                        let p = if i % 2 == 0 {
                            a.alloc(layout)
                        } else {
                            let p = a.alloc_zeroed(layout);
                            assert!(!p.is_null());
                            assert!(filled(p, size, 0), "size {size} align {align}");
                            p
                        };
                        assert!(!p.is_null(), "size {size} align {align}");
                        assert_eq!(p as usize % align, 0, "size {size} align {align}");
                        std::ptr::write_bytes(p, i.wrapping_add(1), size);
                        held.push((p, i.wrapping_add(1)));
                    }
                }
                for (p, fill) in held {
                    // SAFETY: `p` is a live block of `layout`, filled with `fill`.
                    unsafe {
                        let grown = a.realloc(p, layout, size * 2 + 3);
                        assert!(!grown.is_null());
                        assert_eq!(
                            grown as usize % align,
                            0,
                            "grown: size {size} align {align}"
                        );
                        assert!(filled(grown, size, fill), "size {size} align {align}");
                        let bigger = Layout::from_size_align(size * 2 + 3, align).unwrap();
                        let shrunk = a.realloc(grown, bigger, size.div_ceil(2));
                        assert!(!shrunk.is_null());
                        assert_eq!(
                            shrunk as usize % align,
                            0,
                            "shrunk: size {size} align {align}"
                        );
                        assert!(filled(shrunk, size.div_ceil(2), fill));
                        let small = Layout::from_size_align(size.div_ceil(2), align).unwrap();
                        a.dealloc(shrunk, small);
                    }
                }
            }
        }
    }
}
