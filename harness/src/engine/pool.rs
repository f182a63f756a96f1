//! Per-thread reuse of activation buffers. A batch of 64 CIFAR-10 images has 4 MiB
//! activations: allocating each fresh costs page faults on every step, so the engine hands the
//! buffers of values no later node reads back here, and the convolutions take their outputs
//! and scratch buffers from here.

use std::cell::RefCell;

/// Buffers kept per thread; beyond this the smallest is dropped.
const KEEP: usize = 6;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` values of this thread's scratch buffer, which may hold anything. The
/// buffer only grows, so after the first calls no call writes it before `f` does (a pooled
/// buffer, truncated to a smaller request, is zero-extended when a larger one follows).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < buf.len() {
            *s = buf;
        }
    });
    r
}

/// A buffer of `len` zeros: the smallest kept one that fits, else a new one.
pub(crate) fn take_zeroed(len: usize) -> Vec<f32> {
    let mut v = take(len);
    v.fill(0.0);
    v
}

/// A buffer of `len` values that may hold anything (for outputs and scratch that the caller
/// overwrites before reading): the smallest kept one that fits, else a new one.
pub(crate) fn take(len: usize) -> Vec<f32> {
    let mut v = FREE.with(|f| {
        let mut f = f.borrow_mut();
        let best = (f.iter().enumerate())
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        best.map(|i| f.swap_remove(i)).unwrap_or_default()
    });
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v.truncate(len);
    v
}

/// Keeps `v` for a later [`take_zeroed`] on this thread.
pub(crate) fn give_back(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        f.push(v);
        if f.len() > KEEP {
            let smallest = (f.iter().enumerate())
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i)
                .unwrap_or(0);
            f.swap_remove(smallest);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_zeroed_and_the_smallest_fitting_one_is_used() {
        give_back(vec![7.0; 100]);
        give_back(vec![7.0; 10]);
        let a = take_zeroed(8);
        assert_eq!(a, vec![0.0; 8]);
        assert!(
            a.capacity() >= 10 && a.capacity() < 100,
            "took the large one"
        );
        let b = take_zeroed(50);
        assert_eq!(b, vec![0.0; 50]);
        assert!(b.capacity() >= 100, "did not reuse the fitting buffer");
        for _ in 0..KEEP + 3 {
            give_back(vec![1.0; 4]);
        }
        assert_eq!(FREE.with(|f| f.borrow().len()), KEEP);
    }
}
