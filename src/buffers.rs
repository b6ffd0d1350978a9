//! A shard's pool of large body buffers, handed out last-in first-out.
//!
//! Streaming a response through one big buffer lets it leave in one send instead of one per
//! backend read (each send to a local peer costs a wake-up in the kernel). Per-connection
//! buffers that large would cost memory per idle connection and would be cold in the CPU cache
//! when used; a shard-wide LIFO pool hands out the buffer used last, still in cache, and only
//! holds as many as responses stream at the same moment.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Bytes of response gathered before a send: a 64 KiB body and its head fit in one.
pub const BODY_BUFFER: usize = 128 * 1024;
/// Buffers kept for reuse; more than this (after a burst of slow downloads) are freed.
const POOL_KEEP: usize = 32;

#[derive(Default)]
pub struct BufferPool {
    free: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty buffer with room for `BODY_BUFFER` bytes, returned to the pool when dropped.
    pub fn take(&self) -> PooledBuffer<'_> {
        let buf = self
            .free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BODY_BUFFER));
        PooledBuffer { pool: self, buf }
    }

    /// Buffers waiting for reuse.
    pub fn idle(&self) -> usize {
        self.free.borrow().len()
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        let mut free = self.free.borrow_mut();
        // A buffer that grew past its size (a head bigger than usual) is not worth keeping.
        if free.len() < POOL_KEEP && buf.capacity() <= 2 * BODY_BUFFER {
            buf.clear();
            free.push(buf);
        }
    }
}

/// A buffer on loan from a `BufferPool`.
pub struct PooledBuffer<'a> {
    pool: &'a BufferPool,
    buf: Vec<u8>,
}

impl Deref for PooledBuffer<'_> {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl DerefMut for PooledBuffer<'_> {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for PooledBuffer<'_> {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_buffer_returned_is_the_next_handed_out_and_comes_back_empty() {
        let pool = BufferPool::new();
        let first_ptr = {
            let mut a = pool.take();
            a.extend_from_slice(b"payload");
            a.as_ptr()
        };
        assert_eq!(pool.idle(), 1);
        let b = pool.take();
        assert_eq!(
            b.as_ptr(),
            first_ptr,
            "LIFO: the cache-hot buffer is reused"
        );
        assert!(b.is_empty());
        assert!(b.capacity() >= BODY_BUFFER);
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn concurrent_loans_get_distinct_buffers_and_the_pool_keeps_a_bounded_number() {
        let pool = BufferPool::new();
        let loans: Vec<_> = (0..POOL_KEEP + 10).map(|_| pool.take()).collect();
        let mut ptrs: Vec<_> = loans.iter().map(|b| b.as_ptr()).collect();
        ptrs.sort();
        ptrs.dedup();
        assert_eq!(ptrs.len(), POOL_KEEP + 10);
        drop(loans);
        assert_eq!(pool.idle(), POOL_KEEP);
    }

    #[test]
    fn an_overgrown_buffer_is_freed_rather_than_kept() {
        let pool = BufferPool::new();
        {
            let mut big = pool.take();
            big.resize(3 * BODY_BUFFER, 0);
        }
        assert_eq!(pool.idle(), 0);
    }
}
