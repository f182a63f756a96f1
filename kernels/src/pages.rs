//! Zero-filled scratch arrays whose first touch is cheap.
//!
//! A fresh page of anonymous memory costs a fault at its first write. On this project's
//! machines that is about 1.2 us per 4 KiB page, which measured about 4.5 ms of the exact
//! k-means's 25 ms on 270,000 values: its scratch arrays (prefix sums, reciprocals, the
//! penalized pass's arrays) are about 16 MiB, written once each. On Linux, [`Zeroed`]
//! arrays of at least [`HUGE_MIN_BYTES`] are mapped on their own and advised as transparent
//! huge pages, so that one fault maps 2 MiB: touching 16 MiB measured 6.1-7.4 ms in 4 KiB
//! pages and 1.4-2.4 ms in 2 MiB pages. Where the kernel offers no huge pages (or on other
//! systems) the arrays are ordinary zeroed allocations.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Element types whose all-zero bit pattern is the value 0.
pub(crate) trait Zero: Copy {}
impl Zero for f64 {}
impl Zero for f32 {}
impl Zero for u32 {}

/// Arrays of at least this many bytes get their own huge-page mapping (smaller ones are
/// ordinary allocations: a 2 MiB page would be mostly unused).
pub(crate) const HUGE_MIN_BYTES: usize = 1 << 20;

/// A zero-filled array of `len` values ([`Zeroed::new`]).
pub(crate) struct Zeroed<T: Zero> {
    /// The values (a pointer into `_owner`'s memory), so that reading them is one
    /// branch-free slice whichever memory holds them.
    data: NonNull<T>,
    len: usize,
    _owner: Owner<T>,
}

// SAFETY: `Zeroed` owns its values exclusively, like a `Vec<T>`.
unsafe impl<T: Zero + Send> Send for Zeroed<T> {}
unsafe impl<T: Zero + Sync> Sync for Zeroed<T> {}

/// The memory behind a [`Zeroed`] (freed when dropped).
enum Owner<T> {
    Heap(#[allow(dead_code)] Vec<T>),
    #[cfg(target_os = "linux")]
    Mapped(#[allow(dead_code)] huge::Mapping),
}

impl<T: Zero> Zeroed<T> {
    /// `len` zeros (see the module's documentation).
    pub(crate) fn new(len: usize) -> Zeroed<T> {
        #[cfg(target_os = "linux")]
        if len.saturating_mul(std::mem::size_of::<T>()) >= HUGE_MIN_BYTES {
            if let Some(m) = huge::Mapping::new(len * std::mem::size_of::<T>()) {
                return Zeroed {
                    data: m.data().cast(),
                    len,
                    _owner: Owner::Mapped(m),
                };
            }
        }
        let mut v = vec![zero::<T>(); len];
        Zeroed {
            // a Vec's buffer stays where it is when the Vec moves
            data: NonNull::new(v.as_mut_ptr()).expect("a Vec's pointer is not null"),
            len,
            _owner: Owner::Heap(v),
        }
    }

    /// Whether this array is its own mapping advised as huge pages.
    #[cfg(test)]
    fn is_mapped(&self) -> bool {
        !matches!(self._owner, Owner::Heap(_))
    }
}

/// The value 0 of `T` (every [`Zero`] type's zero bit pattern).
fn zero<T: Zero>() -> T {
    // SAFETY: `Zero` is only implemented for types whose all-zero bit pattern is valid.
    unsafe { std::mem::zeroed() }
}

impl<T: Zero> Deref for Zeroed<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised values (zero-filled by the allocator or the kernel,
        // valid for the `Zero` types), aligned (a Vec's buffer or a 2 MiB boundary), owned
        // by `self._owner` for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr(), self.len) }
    }
}

impl<T: Zero> DerefMut for Zeroed<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr(), self.len) }
    }
}

#[cfg(target_os = "linux")]
mod huge {
    use std::ptr::NonNull;

    /// Transparent huge pages' size on x86-64 and on aarch64 with 4 KiB pages.
    const HUGE: usize = 2 << 20;

    /// An anonymous private mapping (zero-filled by the kernel) with `bytes` usable bytes
    /// from a 2 MiB boundary, advised `MADV_HUGEPAGE`.
    pub(super) struct Mapping {
        base: NonNull<libc::c_void>,
        bytes: usize,
        data: NonNull<u8>,
    }

    impl Mapping {
        /// `None` when the mapping fails (the caller falls back to the heap).
        pub(super) fn new(used: usize) -> Option<Mapping> {
            // whole huge pages, plus one of slack to reach a 2 MiB boundary (never touched,
            // so never backed by memory)
            let advised = used.checked_add(HUGE - 1)? & !(HUGE - 1);
            let bytes = advised.checked_add(HUGE)?;
            // SAFETY: a fresh anonymous mapping, no existing memory is affected.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return None;
            }
            let base = NonNull::new(base)?;
            let offset = (HUGE - base.as_ptr() as usize % HUGE) % HUGE;
            // SAFETY: offset < HUGE, so offset + advised <= bytes: within the mapping.
            let data = unsafe { base.as_ptr().cast::<u8>().add(offset) };
            // SAFETY: advice only; a failure (no THP support) leaves ordinary pages.
            unsafe { libc::madvise(data.cast(), advised, libc::MADV_HUGEPAGE) };
            Some(Mapping {
                base,
                bytes,
                data: NonNull::new(data)?,
            })
        }

        /// The first usable byte (2 MiB aligned).
        pub(super) fn data(&self) -> NonNull<u8> {
            self.data
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: the whole mapping made in `new`, unmapped once.
            unsafe { libc::munmap(self.base.as_ptr(), self.bytes) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_start_zero_and_hold_what_is_written() {
        for len in [0usize, 1, 1000, HUGE_MIN_BYTES / 8, 3 << 20] {
            let mut a = Zeroed::<f64>::new(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 0.0), "len {len}");
            for (i, v) in a.iter_mut().enumerate() {
                *v = i as f64;
            }
            assert!(a.iter().enumerate().all(|(i, &v)| v == i as f64));
            let mut b = Zeroed::<u32>::new(len);
            assert!(b.iter().all(|&v| v == 0));
            if let Some(last) = b.last_mut() {
                *last = 7;
            }
            assert_eq!(b.last().copied(), (len > 0).then_some(7));
        }
    }

    #[test]
    fn large_arrays_are_mapped_on_linux_small_ones_are_not() {
        let large = Zeroed::<u32>::new(HUGE_MIN_BYTES / 4);
        let small = Zeroed::<u32>::new(HUGE_MIN_BYTES / 4 - 1);
        assert_eq!(large.is_mapped(), cfg!(target_os = "linux"));
        assert!(!small.is_mapped());
        if large.is_mapped() {
            assert_eq!(large.as_ptr() as usize % (2 << 20), 0);
        }
    }
}
