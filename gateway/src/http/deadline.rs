//! Request deadlines at a coarse resolution, one set per worker.
//!
//! `tokio::time::timeout` registers and removes a timer-wheel entry for every request,
//! which costs more than the rest of the gateway's own per-request bookkeeping. An upstream
//! timeout does not need millisecond precision, so here a request only takes a slot in the
//! worker's slab; one ticker per worker wakes the requests whose deadline has passed. A
//! timeout fires between its deadline and one resolution after it.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use slab::Slab;
use tokio::time::Instant;

pub struct Deadlines {
    slots: RefCell<Slab<Slot>>,
    resolution: Duration,
}

struct Slot {
    due: Instant,
    waker: Waker,
    expired: bool,
    /// A [`Timer`] between uses: never due.
    armed: bool,
    /// A [`Timer`]'s slot, which [`Deadlines::expire_timers`] ends early.
    timer: bool,
}

/// The deadline passed before the future finished.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

impl Deadlines {
    /// Deadlines checked every `resolution`: a twentieth of the usual timeout keeps the
    /// overshoot at 5% while the ticker stays idle almost all the time.
    pub fn new(resolution: Duration) -> Rc<Self> {
        Rc::new(Self {
            slots: RefCell::new(Slab::new()),
            resolution: resolution.max(Duration::from_millis(1)),
        })
    }

    /// The resolution for a timeout: 5% of it, between 5 ms and 250 ms.
    pub fn resolution_for(timeout: Duration) -> Duration {
        (timeout / 20).clamp(Duration::from_millis(5), Duration::from_millis(250))
    }

    /// Expires overdue slots every resolution until the worker's runtime ends. Runs on
    /// the worker's `LocalSet`.
    pub fn spawn_ticker(self: &Rc<Self>) {
        let deadlines: Weak<Self> = Rc::downgrade(self);
        let period = self.resolution;
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(deadlines) = deadlines.upgrade() else {
                    return;
                };
                deadlines.expire(Instant::now());
            }
        });
    }

    /// Marks every slot due at or before `now` as expired and wakes its task.
    fn expire(&self, now: Instant) {
        let mut due = Vec::new();
        for (_, slot) in self.slots.borrow_mut().iter_mut() {
            if slot.armed && !slot.expired && slot.due <= now {
                slot.expired = true;
                due.push(slot.waker.clone());
            }
        }
        // Woken outside the borrow: a woken future may touch the slab when polled.
        for waker in due {
            waker.wake();
        }
    }

    /// Expires every armed [`Timer`] now (a draining worker ends idle waits at once).
    pub fn expire_timers(&self) {
        let mut due = Vec::new();
        for (_, slot) in self.slots.borrow_mut().iter_mut() {
            if slot.timer && slot.armed && !slot.expired {
                slot.expired = true;
                due.push(slot.waker.clone());
            }
        }
        for waker in due {
            waker.wake();
        }
    }

    /// A slot kept for many waits (a connection's, for each request head): arming it
    /// costs a store, not a slab insertion.
    pub fn timer(self: &Rc<Self>) -> Timer {
        let key = self.slots.borrow_mut().insert(Slot {
            due: Instant::now(),
            waker: futures_util::task::noop_waker(),
            expired: false,
            armed: false,
            timer: true,
        });
        Timer {
            deadlines: self.clone(),
            key,
        }
    }

    /// `future`, failed with [`Elapsed`] if it has not finished by `due`.
    pub fn run_until<F: Future>(self: &Rc<Self>, due: Instant, future: F) -> Within<F> {
        Within {
            inner: future,
            deadlines: self.clone(),
            due,
            key: None,
        }
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.slots.borrow().len()
    }
}

/// A reusable deadline: armed for each wait, disarmed after it.
pub struct Timer {
    deadlines: Rc<Deadlines>,
    key: usize,
}

impl Timer {
    pub fn arm(&self, due: Instant) {
        let mut slots = self.deadlines.slots.borrow_mut();
        let slot = &mut slots[self.key];
        slot.due = due;
        slot.armed = true;
        slot.expired = false;
    }

    pub fn disarm(&self) {
        self.deadlines.slots.borrow_mut()[self.key].armed = false;
    }

    /// Whether the armed deadline has passed; if not, `cx` is woken when it does.
    pub fn poll_expired(&self, cx: &Context<'_>) -> bool {
        let mut slots = self.deadlines.slots.borrow_mut();
        let slot = &mut slots[self.key];
        if slot.expired {
            return true;
        }
        if !slot.waker.will_wake(cx.waker()) {
            slot.waker = cx.waker().clone();
        }
        false
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.deadlines.slots.borrow_mut().remove(self.key);
    }
}

pin_project! {
    pub struct Within<F> {
        #[pin]
        inner: F,
        deadlines: Rc<Deadlines>,
        due: Instant,
        key: Option<usize>,
    }

    impl<F> PinnedDrop for Within<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(key) = this.key.take() {
                this.deadlines.slots.borrow_mut().remove(key);
            }
        }
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(key) = *this.key
            && this.deadlines.slots.borrow()[key].expired
        {
            this.deadlines.slots.borrow_mut().remove(key);
            *this.key = None;
            return Poll::Ready(Err(Elapsed));
        }
        match this.inner.poll(cx) {
            Poll::Ready(output) => {
                if let Some(key) = this.key.take() {
                    this.deadlines.slots.borrow_mut().remove(key);
                }
                Poll::Ready(Ok(output))
            }
            Poll::Pending => {
                let mut slots = this.deadlines.slots.borrow_mut();
                match *this.key {
                    None => {
                        *this.key = Some(slots.insert(Slot {
                            due: *this.due,
                            waker: cx.waker().clone(),
                            expired: false,
                            armed: true,
                            timer: false,
                        }));
                    }
                    Some(key) => {
                        let slot = &mut slots[key];
                        if !slot.waker.will_wake(cx.waker()) {
                            slot.waker = cx.waker().clone();
                        }
                    }
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local<F: Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, future)
    }

    #[test]
    fn a_future_that_finishes_in_time_leaves_no_slot() {
        local(async {
            let deadlines = Deadlines::new(Duration::from_millis(10));
            deadlines.spawn_ticker();
            let due = Instant::now() + Duration::from_secs(1);
            let out = deadlines
                .run_until(due, async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    7
                })
                .await;
            assert_eq!(out, Ok(7));
            assert_eq!(deadlines.pending(), 0);
        });
    }

    #[test]
    fn an_overdue_future_fails_within_one_resolution() {
        local(async {
            let deadlines = Deadlines::new(Duration::from_millis(10));
            deadlines.spawn_ticker();
            let started = tokio::time::Instant::now();
            let due = Instant::now() + Duration::from_millis(100);
            let out = deadlines.run_until(due, std::future::pending::<()>()).await;
            assert_eq!(out, Err(Elapsed));
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(100) && took <= Duration::from_millis(110),
                "{took:?}"
            );
            assert_eq!(deadlines.pending(), 0);
        });
    }

    #[test]
    fn a_dropped_future_gives_its_slot_back() {
        local(async {
            let deadlines = Deadlines::new(Duration::from_millis(10));
            let due = Instant::now() + Duration::from_secs(1);
            let mut within = Box::pin(deadlines.run_until(due, std::future::pending::<()>()));
            let waker = futures_util::task::noop_waker();
            assert!(
                within
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
            assert_eq!(deadlines.pending(), 1);
            drop(within);
            assert_eq!(deadlines.pending(), 0);
        });
    }

    #[test]
    fn a_timer_fires_when_armed_and_can_be_ended_early() {
        local(async {
            let deadlines = Deadlines::new(Duration::from_millis(10));
            deadlines.spawn_ticker();
            let timer = deadlines.timer();
            let expired = || {
                std::future::poll_fn(|cx| {
                    if timer.poll_expired(cx) {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
            };
            let started = Instant::now();
            timer.arm(started + Duration::from_millis(100));
            expired().await;
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(100) && took <= Duration::from_millis(110));
            timer.arm(Instant::now() + Duration::from_secs(60));
            deadlines.expire_timers();
            expired().await;
            timer.disarm();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(deadlines.pending(), 1, "the timer keeps its slot");
            drop(timer);
            assert_eq!(deadlines.pending(), 0);
        });
    }

    #[test]
    fn resolution_scales_with_the_timeout() {
        assert_eq!(
            Deadlines::resolution_for(Duration::from_secs(10)),
            Duration::from_millis(250)
        );
        assert_eq!(
            Deadlines::resolution_for(Duration::from_millis(300)),
            Duration::from_millis(15)
        );
        assert_eq!(
            Deadlines::resolution_for(Duration::from_millis(10)),
            Duration::from_millis(5)
        );
    }
}
