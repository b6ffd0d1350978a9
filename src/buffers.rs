//! A shard's pools of buffers, handed out last-in first-out.
//!
//! Streaming a response through one big buffer lets it leave in one send instead of one per
//! backend read (each send to a local peer costs a wake-up in the kernel). Per-connection
//! buffers that large would cost memory per idle connection and would be cold in the CPU cache
//! when used; a shard-wide LIFO pool hands out the buffer used last, still in cache, and only
//! holds as many as responses stream at the same moment. Client connections take their
//! receive buffer from a pool too: a connection per request would otherwise allocate and zero
//! 16 KiB each time.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Bytes of response gathered before a send: a 64 KiB body and its head fit in one.
pub const BODY_BUFFER: usize = 128 * 1024;

pub struct BufferPool {
    free: RefCell<Vec<Vec<u8>>>,
    size: usize,
    /// Buffers kept for reuse; more than this (after a burst of connections or slow downloads)
    /// are freed.
    keep: usize,
}

impl BufferPool {
    /// A pool of `size`-byte buffers that keeps at most `keep` of them when they come back.
    pub fn new(size: usize, keep: usize) -> Self {
        BufferPool {
            free: RefCell::new(Vec::new()),
            size,
            keep,
        }
    }

    /// An empty buffer with room for the pool's size, returned to the pool when dropped.
    pub fn take(&self) -> PooledBuffer<'_> {
        let mut buf = self.free.borrow_mut().pop().unwrap_or_default();
        buf.clear();
        buf.reserve(self.size);
        PooledBuffer { pool: self, buf }
    }

    /// A buffer of exactly the pool's size, its bytes initialised but unspecified (a read
    /// target), to hand back with `put_filled`.
    pub fn take_filled(&self) -> Vec<u8> {
        let mut buf = self.free.borrow_mut().pop().unwrap_or_default();
        buf.resize(self.size, 0);
        buf
    }

    /// Takes back a buffer from `take_filled`.
    pub fn put_filled(&self, buf: Vec<u8>) {
        self.keep_if_fit(buf);
    }

    /// Buffers waiting for reuse.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.free.borrow().len()
    }

    fn keep_if_fit(&self, buf: Vec<u8>) {
        let mut free = self.free.borrow_mut();
        // A buffer that grew past its size (a head bigger than usual) is not worth keeping.
        if free.len() < self.keep && buf.capacity() <= 2 * self.size {
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
        self.pool.keep_if_fit(std::mem::take(&mut self.buf));
    }
}

/// Lists filled anew for each request, such as a request head's field ranges: a new
/// connection takes one that already has room instead of growing one from empty (an
/// allocation and a reallocation per connection otherwise).
pub struct ListPool<T> {
    free: RefCell<Vec<Vec<T>>>,
    /// Lists kept for reuse.
    keep: usize,
    /// Capacity above which a returned list is freed rather than kept.
    most: usize,
}

impl<T> ListPool<T> {
    pub fn new(keep: usize, most: usize) -> Self {
        ListPool {
            free: RefCell::new(Vec::new()),
            keep,
            most,
        }
    }

    /// An empty list, to hand back with `put`.
    pub fn take(&self) -> Vec<T> {
        self.free.borrow_mut().pop().unwrap_or_default()
    }

    pub fn put(&self, mut list: Vec<T>) {
        list.clear();
        let mut free = self.free.borrow_mut();
        if free.len() < self.keep && list.capacity() <= self.most {
            free.push(list);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_buffer_returned_is_the_next_handed_out_and_comes_back_empty() {
        let pool = BufferPool::new(BODY_BUFFER, 4);
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
        let pool = BufferPool::new(1024, 8);
        let loans: Vec<_> = (0..18).map(|_| pool.take()).collect();
        let mut ptrs: Vec<_> = loans.iter().map(|b| b.as_ptr()).collect();
        ptrs.sort();
        ptrs.dedup();
        assert_eq!(ptrs.len(), 18);
        drop(loans);
        assert_eq!(pool.idle(), 8);
    }

    #[test]
    fn an_overgrown_buffer_is_freed_rather_than_kept() {
        let pool = BufferPool::new(1024, 8);
        {
            let mut big = pool.take();
            big.resize(3 * 1024, 0);
        }
        assert_eq!(pool.idle(), 0);
        let mut grown = pool.take_filled();
        grown.resize(4096, 0);
        pool.put_filled(grown);
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn filled_buffers_have_the_pool_size_and_are_reused_without_reallocation() {
        let pool = BufferPool::new(16 * 1024, 8);
        let mut a = pool.take_filled();
        assert_eq!(a.len(), 16 * 1024);
        a[0] = 7;
        let ptr = a.as_ptr();
        pool.put_filled(a);
        let b = pool.take_filled();
        assert_eq!(b.len(), 16 * 1024);
        assert_eq!(b.as_ptr(), ptr);
    }

    #[test]
    fn lists_come_back_empty_with_their_room_and_the_pool_stays_bounded() {
        let pool = ListPool::<u32>::new(2, 64);
        let mut a = pool.take();
        a.extend(0..10);
        let ptr = a.as_ptr();
        pool.put(a);
        let b = pool.take();
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr, "the room of the last list is reused");
        assert!(b.capacity() >= 10);
        let mut big = Vec::with_capacity(65);
        big.push(1);
        pool.put(big);
        pool.put(b);
        pool.put(Vec::with_capacity(4));
        pool.put(Vec::with_capacity(4));
        assert_eq!(
            pool.free.borrow().len(),
            2,
            "an overgrown list is freed, at most two kept"
        );
    }
}
