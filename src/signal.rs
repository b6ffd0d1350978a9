//! A one-shot broadcast inside a shard: its shutdown, which every idle wait listens for.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// One-shot broadcast inside a shard: shutdown wakes the accept loop and idle connections.
/// Every keep-alive wait registers here, so waiters live in a slab (a slot index each, reused
/// through a free list) rather than a hash map.
#[derive(Default)]
pub struct Signal {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Option<Waker>>>,
    free_slots: RefCell<Vec<usize>>,
}

impl Signal {
    pub fn fire(&self) {
        self.fired.set(true);
        let wakers: Vec<Waker> = self
            .waiters
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }
    /// A future that completes once the signal fires.
    pub fn wait(&self) -> SignalWait<'_> {
        SignalWait {
            signal: self,
            slot: None,
        }
    }

    /// Runs `work` until it completes (`Some`) or the signal fires first (`None`).
    pub async fn unless_fired<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        futures_lite::future::or(async { Some(work.await) }, async {
            self.wait().await;
            None
        })
        .await
    }
    /// Waiters currently registered.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiters.borrow().iter().filter(|w| w.is_some()).count()
    }
}

pub struct SignalWait<'a> {
    signal: &'a Signal,
    slot: Option<usize>,
}

impl Future for SignalWait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.signal.waiters.borrow_mut();
        let slot = match self.slot {
            Some(slot) => slot,
            None => match self.signal.free_slots.borrow_mut().pop() {
                Some(slot) => slot,
                None => {
                    waiters.push(None);
                    waiters.len() - 1
                }
            },
        };
        match &mut waiters[slot] {
            Some(w) if w.will_wake(cx.waker()) => {}
            entry => *entry = Some(cx.waker().clone()),
        }
        drop(waiters);
        self.slot = Some(slot);
        Poll::Pending
    }
}

impl Drop for SignalWait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            if let (Ok(mut waiters), Ok(mut free)) = (
                self.signal.waiters.try_borrow_mut(),
                self.signal.free_slots.try_borrow_mut(),
            ) {
                waiters[slot] = None;
                free.push(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(wait: &mut SignalWait<'_>, waker: &Waker) -> Poll<()> {
        Pin::new(wait).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn fire_wakes_every_pending_waiter_once_and_later_waits_complete_at_once() {
        let signal = Signal::default();
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut a = signal.wait();
        let mut b = signal.wait();
        assert!(poll(&mut a, &waker).is_pending());
        assert!(poll(&mut b, &waker).is_pending());
        assert!(
            poll(&mut a, &waker).is_pending(),
            "a re-poll keeps one registration"
        );
        assert_eq!(signal.waiting(), 2);
        signal.fire();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert!(poll(&mut a, &waker).is_ready());
        assert!(poll(&mut signal.wait(), &waker).is_ready());
    }

    #[test]
    fn dropped_waiters_free_their_slot_for_the_next_one() {
        let signal = Signal::default();
        let waker = Waker::noop();
        for _ in 0..1000 {
            let mut w = signal.wait();
            assert!(poll(&mut w, waker).is_pending());
            assert_eq!(signal.waiting(), 1);
        }
        assert_eq!(signal.waiting(), 0);
        assert_eq!(
            signal.waiters.borrow().len(),
            1,
            "one slot, reused 1000 times"
        );
    }
}
