//! The exactly-once protocol of one edge as plain state machines, without Python and without a
//! transport: what a producer may send, keeps, resends and forgets ([`OutBooks`]), what a
//! consumer accepts and acknowledges ([`InBooks`]). The ports (outport.rs, inport.rs) drive a
//! transport by what these decide; `cargo test` checks the decisions frame by frame.

use std::collections::VecDeque;

/// A frame kept for replay, with the payload `F` the port needs to send it again.
pub struct Kept<F> {
    pub seq: u64,
    pub nbytes: u64,
    /// Still a view of a chunk this producer loaned and sent (see OutPort's copy on reuse).
    pub loaned: bool,
    pub frame: F,
}

/// Where a new frame goes (see [`OutBooks::assign`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Assign {
    /// Send it under this seq.
    Send(u64),
    /// Regenerated after a restart and already committed downstream: drop it (its seq).
    Skip(u64),
}

/// The producer end's books.
pub struct OutBooks<F> {
    pub lossless: bool,
    pub depth: u64,
    pub max_bytes: u64,
    /// The consumer's stream ended: it took its end of stream and made its final commit
    /// (known at a restart, or relayed later: `consumer_ended`).
    pub consumer_finished: bool,
    pub next_seq: u64,
    /// Frames the consumer has processed / committed (counts).
    pub processed: u64,
    pub committed: u64,
    pub retained: VecDeque<Kept<F>>,
    pub retained_bytes: u64,
    pub loaned_retained: u64,
    pub last_nbytes: u64,
    /// Seq of the first retained frame not known to be delivered (None: all delivered).
    pub undelivered: Option<u64>,
    pub retry_at: f64,
    pub retry_delay: f64,
    /// (frame the consumer waits for, read at ns)
    pub probe: Option<(u64, u64)>,
    pub eos_sent: bool,
}

impl<F> OutBooks<F> {
    pub fn new(lossless: bool, depth: u64, max_bytes: u64, next_seq: u64, committed: u64, consumer_finished: bool) -> Self {
        let start = next_seq.max(committed);
        OutBooks {
            lossless,
            depth,
            max_bytes,
            consumer_finished,
            next_seq,
            processed: start,
            committed: start,
            retained: VecDeque::new(),
            retained_bytes: 0,
            loaned_retained: 0,
            last_nbytes: 0,
            undelivered: None,
            retry_at: 0.0,
            retry_delay: 0.002,
            probe: None,
            eos_sent: false,
        }
    }

    /// A lossless edge lets at most `depth` frames, and about `max_bytes` of them, be in
    /// flight (sent, not processed); a lossy one never waits.
    pub fn has_room(&self) -> bool {
        if !self.lossless {
            return true;
        }
        let n = self.next_seq.saturating_sub(self.processed);
        n == 0 || (n < self.depth && n * self.last_nbytes < self.max_bytes)
    }

    /// The seq of a new frame (`eos`: an end of stream). After a restart a regenerated frame
    /// already committed downstream is skipped; an end of stream the consumer has not seen
    /// becomes the next frame it takes (behind a lossy edge the outputs may number
    /// differently). Once the consumer's stream has ended, every frame is skipped: nothing
    /// reaches it any more, so nothing is kept or waited for.
    pub fn assign(&mut self, eos: bool) -> Assign {
        let seq = self.next_seq;
        self.next_seq += 1;
        if eos {
            self.eos_sent = true;
        }
        if !self.lossless {
            return Assign::Send(seq);
        }
        if self.consumer_finished {
            self.processed = self.processed.max(self.next_seq);
            self.committed = self.committed.max(self.next_seq);
            return Assign::Skip(seq);
        }
        if seq >= self.committed {
            return Assign::Send(seq);
        }
        if !eos {
            return Assign::Skip(seq);
        }
        self.next_seq = self.committed + 1;
        Assign::Send(self.committed)
    }

    /// The consumer ended its stream and exited (its final commit, relayed by the
    /// supervisor). A producer restarted before it knew regenerates its outputs, and an end of
    /// stream numbered past what the consumer committed would wait for an ack forever: what is
    /// kept is forgotten, everything counts as committed, and later frames are skipped.
    pub fn consumer_ended(&mut self) {
        if !self.lossless {
            return;
        }
        self.consumer_finished = true;
        self.retained.clear();
        self.retained_bytes = 0;
        self.loaned_retained = 0;
        self.undelivered = None;
        self.probe = None;
        self.processed = self.processed.max(self.next_seq);
        self.committed = self.committed.max(self.next_seq);
    }

    /// Keeps a frame of a lossless edge for replay.
    pub fn keep(&mut self, k: Kept<F>) {
        self.retained_bytes += k.nbytes;
        self.last_nbytes = k.nbytes;
        if k.loaned {
            self.loaned_retained += 1;
        }
        self.retained.push_back(k);
    }

    /// The publish of `seq` was discarded (the consumer's queue was full, or it is gone): it
    /// and every later frame go again, in order, after a backoff from `now`.
    pub fn discarded(&mut self, seq: u64, now: f64) {
        self.undelivered = Some(seq);
        self.schedule_retry(now, true);
    }

    pub fn schedule_retry(&mut self, now: f64, reset: bool) {
        self.retry_delay = if reset { 0.002 } else { (self.retry_delay * 2.0).min(0.1) };
        self.retry_at = now + self.retry_delay;
    }

    /// An ack: the consumer processed `processed` frames and committed `committed`; the
    /// committed ones are forgotten. True on progress.
    pub fn apply(&mut self, processed: u64, committed: u64) -> bool {
        let mut progress = false;
        if processed > self.processed {
            self.processed = processed.min(self.next_seq);
            progress = true;
        }
        if committed > self.committed {
            self.committed = committed;
            progress = true;
            while self.retained.front().is_some_and(|r| r.seq < committed) {
                let r = self.retained.pop_front().expect("front checked");
                self.retained_bytes -= r.nbytes;
                if r.loaned {
                    self.loaned_retained -= 1;
                }
            }
            if self.undelivered.is_some_and(|u| u < committed) {
                self.undelivered = self.retained.front().map(|r| r.seq);
            }
        }
        if progress && self.undelivered.is_some() {
            self.retry_at = 0.0; // room was made: resend now
        }
        progress
    }

    /// A probe: the consumer's queue was empty at `probed_ns` while it waited for frame
    /// `want`. Had `want` been published before an earlier probe for it was read, it was lost
    /// by the transport: returns the lost range `want..end` to resend (the books are set for
    /// it). A probe sent before we read the first may predate the publish: it only arms.
    pub fn probed(&mut self, want: u64, probed_ns: u64, now_ns: u64) -> Option<(u64, u64)> {
        let end = self.undelivered.unwrap_or(self.next_seq);
        if !self.lossless || want >= end || want < self.committed {
            self.probe = None; // nothing published that it waits for
            return None;
        }
        match self.probe {
            Some((w, at)) if w == want && probed_ns > at => {}
            _ => {
                self.probe = Some((want, now_ns));
                return None;
            }
        }
        self.probe = None;
        self.processed = self.processed.min(want);
        self.undelivered = Some(want);
        Some((want, end))
    }

    /// A restarted consumer committed up to `after`: it has processed nothing beyond, and
    /// every retained frame after it goes again. On a lossy edge nothing is kept: what the
    /// dead consumer had queued counts as taken; true when the end of the stream must be
    /// repeated then.
    pub fn replay(&mut self, after: i64) -> bool {
        if !self.lossless {
            self.processed = self.next_seq - u64::from(self.eos_sent);
            return self.eos_sent;
        }
        self.processed = self.processed.min((after + 1).max(0) as u64);
        if let Some(first) = self.retained.iter().map(|r| r.seq).find(|&s| s as i64 > after)
            && self.undelivered.is_none_or(|u| first < u)
        {
            self.undelivered = Some(first);
        }
        self.retry_at = 0.0;
        false
    }

    /// Indexes in `retained` of the frames to resend now (the undelivered tail), if its retry
    /// time has come (or `force`).
    pub fn due(&self, now: f64, force: bool) -> Option<std::ops::Range<usize>> {
        let first = self.undelivered?;
        if !force && now < self.retry_at {
            return None;
        }
        let start = self.retained.iter().position(|r| r.seq >= first).unwrap_or(self.retained.len());
        Some(start..self.retained.len())
    }

    /// After a resend: `stopped_at` is the seq that was discarded (None: the whole tail went).
    pub fn resent(&mut self, stopped_at: Option<u64>, sent_any: bool, now: f64) {
        match stopped_at {
            None => self.undelivered = None,
            Some(seq) => {
                self.undelivered = Some(seq);
                self.schedule_retry(now, sent_any);
            }
        }
    }

    pub fn fully_acked(&self) -> bool {
        if !self.lossless {
            return self.processed >= self.next_seq;
        }
        self.retained.is_empty()
    }
}

/// What the consumer does with a received frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Accept {
    /// The next frame: take it.
    Take,
    /// Already taken (a restarted producer regenerates it): drop it, answer with an ack.
    Duplicate,
    /// Beyond a gap on a lossless edge: drop it; the gap is reported for a replay.
    Gap,
}

/// The consumer end's books.
/// Whether an ack wakes its producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    No,
    /// Only if it sleeps waiting for room (flow control); a producer asleep for another
    /// reason finds the ack when it wakes (doorbell `flow`, see Bell::ring_flow).
    Flow,
    /// Whatever it waits for: commits, ends of stream, answers to duplicates.
    Always,
}

pub struct InBooks {
    pub lossless: bool,
    pub depth: u64,
    pub max_bytes: u64,
    pub expected: u64,
    pub eos: bool,
    pub eos_seq: Option<u64>,
    pub acked_processed: u64,
    pub acked_committed: u64,
    pub notified_processed: u64,
    /// The producer's window in frames: `depth`, or fewer when `max_bytes` of its frames fill
    /// it first (estimated from the size of the frames taken).
    pub window: u64,
    pub notify_every: u64,
    pub frame_len: i64,
    pub gap_since: Option<f64>,
    pub gap_reported_at: f64,
    pub received: u64,
    pub duplicates: u64,
    pub dup_pending: bool,
    /// Frames lost on a lossy edge.
    pub dropped: u64,
}

impl InBooks {
    pub fn new(lossless: bool, depth: u64, max_bytes: u64, expected: u64) -> Self {
        InBooks {
            lossless,
            depth,
            max_bytes,
            expected,
            eos: false,
            eos_seq: None,
            acked_processed: expected,
            acked_committed: expected,
            notified_processed: expected,
            window: depth,
            notify_every: (depth / 2).max(1),
            frame_len: -1,
            gap_since: None,
            gap_reported_at: 0.0,
            received: 0,
            duplicates: 0,
            dup_pending: false,
            dropped: 0,
        }
    }

    /// The sequence checks of one received frame (`len`: its payload length).
    pub fn accept(&mut self, seq: u64, eos: bool, len: usize, now: f64) -> Accept {
        if seq < self.expected {
            if eos && !self.eos {
                // an end of stream is never a duplicate (see OutBooks::assign)
                self.eos = true;
                self.eos_seq = Some(self.expected - 1);
                self.received += 1;
                return Accept::Take;
            }
            self.duplicates += 1;
            self.dup_pending = true;
            return Accept::Duplicate;
        }
        if seq > self.expected {
            if self.lossless {
                if self.gap_since.is_none() {
                    self.gap_since = Some(now);
                }
                return Accept::Gap;
            }
            self.dropped += seq - self.expected;
        }
        self.took(seq);
        if eos {
            self.eos = true;
            self.eos_seq = Some(seq);
        } else {
            self.sized(len);
        }
        Accept::Take
    }

    /// A data frame of `len` payload bytes was taken: the producer's window in frames is
    /// `depth`, or fewer when `max_bytes` of such frames fill it first.
    pub fn sized(&mut self, len: usize) {
        if len as i64 != self.frame_len {
            // A payload is a little larger than what the producer counts, so this never
            // overestimates its window.
            self.frame_len = len as i64;
            self.window = self.depth.min(self.max_bytes.div_ceil(len.max(1) as u64)).max(1);
            self.notify_every = (self.window / 2).max(1);
        }
    }

    /// Frame `seq` was taken in order (checked by the subscriber itself on the hot path).
    pub fn took(&mut self, seq: u64) {
        self.expected = seq + 1;
        self.gap_since = None;
        self.received += 1;
    }

    /// An ack of `processed`/`committed` counts: None when there is nothing new to say
    /// (unless `force` or a duplicate arrived), else whether to wake the producer (see Wake).
    /// `queued` tells whether frames wait in our queue (asked only when it matters).
    pub fn ack(&mut self, processed: u64, committed: u64, force: bool, queued: impl FnOnce() -> bool) -> Option<Wake> {
        let force = force || self.dup_pending;
        self.dup_pending = false;
        if !force && processed <= self.acked_processed && committed <= self.acked_committed {
            return None;
        }
        self.acked_processed = self.acked_processed.max(processed);
        let new_commit = committed > self.acked_committed;
        self.acked_committed = self.acked_committed.max(committed);
        // Waking the producer costs it (and the CPU) a context switch per ack. For flow
        // control it only waits with a full window, and then we have half a window to take
        // before it could be stuck: wake it every half window. Commits (at most every 10 ms
        // per worker) always wake it: its own commits, and so its producer's reuse of loaned
        // chunks, wait on them.
        let wake = if force || new_commit || self.eos_seq.is_some_and(|e| self.acked_processed > e) {
            Wake::Always
        } else if self.acked_processed - self.notified_processed >= self.notify_every && self.producer_may_wait(queued) {
            Wake::Flow
        } else {
            Wake::No
        };
        if wake != Wake::No {
            self.notified_processed = self.acked_processed;
        }
        Some(wake)
    }

    /// The producer waits for room only with a full window in flight beyond what it last
    /// learned, and it learned at least `notified_processed`. With our queue empty we hold
    /// every frame it sent, so `expected` bounds its next seq: below that line it cannot be
    /// waiting (a paced stream's case). With frames queued it may be refilling.
    pub fn producer_may_wait(&self, queued: impl FnOnce() -> bool) -> bool {
        self.expected >= self.notified_processed + self.window || queued()
    }

    /// Whether to send a probe now (our queue is empty: `queued` false).
    pub fn should_probe(&self, queued: impl FnOnce() -> bool) -> bool {
        self.lossless && !self.eos && self.gap_since.is_none() && !queued()
    }

    /// The seq to ask a replay from, when a gap has lasted `min_age` and was not reported in
    /// the last `interval` seconds.
    pub fn gap_to_report(&mut self, now: f64, min_age: f64, interval: f64) -> Option<u64> {
        let since = self.gap_since?;
        if now - since < min_age || now - self.gap_reported_at < interval {
            return None;
        }
        self.gap_reported_at = now;
        Some(self.expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(depth: u64) -> OutBooks<u64> {
        OutBooks::new(true, depth, 1 << 30, 0, 0, false)
    }

    fn send(o: &mut OutBooks<u64>, nbytes: u64) -> u64 {
        let Assign::Send(seq) = o.assign(false) else { panic!("skipped") };
        o.keep(Kept { seq, nbytes, loaned: false, frame: seq });
        seq
    }

    #[test]
    fn window_in_frames_and_bytes() {
        let mut o = out(4);
        for _ in 0..3 {
            assert!(o.has_room());
            send(&mut o, 10);
        }
        assert!(o.has_room());
        send(&mut o, 10);
        assert!(!o.has_room(), "4 in flight of 4");
        assert!(o.apply(2, 0));
        assert!(o.has_room());
        let mut b = OutBooks::<u64>::new(true, 100, 25, 0, 0, false);
        send(&mut b, 10);
        send(&mut b, 10);
        assert!(b.has_room(), "20 bytes < 25");
        send(&mut b, 10);
        assert!(!b.has_room(), "30 bytes >= 25");
        let mut lossy = OutBooks::<u64>::new(false, 1, 1, 0, 0, false);
        lossy.assign(false);
        lossy.assign(false);
        assert!(lossy.has_room(), "a lossy edge never waits");
    }

    #[test]
    fn commits_forget_retained_frames_and_move_the_undelivered_tail() {
        let mut o = out(8);
        for _ in 0..5 {
            send(&mut o, 7);
        }
        o.discarded(3, 1.0);
        assert_eq!(o.undelivered, Some(3));
        assert!(o.apply(3, 2));
        assert_eq!(o.retained.iter().map(|k| k.seq).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(o.retained_bytes, 21);
        assert_eq!(o.retry_at, 0.0, "progress: resend now");
        o.apply(5, 4);
        assert_eq!(o.undelivered, Some(4), "a commit past the tail's start moves it");
        o.apply(5, 5);
        assert_eq!(o.undelivered, None);
        assert!(o.fully_acked());
        assert!(!o.apply(5, 5), "no news, no progress");
    }

    #[test]
    fn resends_back_off_and_go_in_order() {
        let mut o = out(8);
        for _ in 0..4 {
            send(&mut o, 1);
        }
        o.discarded(1, 10.0);
        assert_eq!(o.due(10.001, false), None, "not before its retry time");
        assert_eq!(o.due(10.001, true), Some(1..4));
        assert_eq!(o.due(10.0021, false), Some(1..4));
        o.resent(Some(2), true, 10.01);
        assert_eq!((o.undelivered, o.retry_at), (Some(2), 10.012), "sent some: the backoff restarts");
        o.resent(Some(2), false, 10.02);
        assert!((o.retry_at - 10.024).abs() < 1e-9, "nothing went: it doubles");
        o.resent(None, true, 10.03);
        assert_eq!(o.undelivered, None);
        assert_eq!(o.due(11.0, true), None);
    }

    #[test]
    fn regenerated_frames_are_skipped_and_a_late_end_of_stream_is_not() {
        let mut o = OutBooks::<u64>::new(true, 8, 1 << 20, 0, 3, false);
        assert_eq!(o.assign(false), Assign::Skip(0));
        assert_eq!(o.assign(false), Assign::Skip(1));
        assert_eq!(o.assign(true), Assign::Send(3), "the end of stream is the next frame the consumer takes");
        assert_eq!(o.next_seq, 4);
        let mut done = OutBooks::<u64>::new(true, 8, 1 << 20, 0, 3, true);
        assert_eq!(done.assign(true), Assign::Skip(0), "its consumer already ended");
        let mut lossy = OutBooks::<u64>::new(false, 8, 1 << 20, 0, 3, false);
        assert_eq!(lossy.assign(false), Assign::Send(0), "nothing is skipped on a lossy edge");
    }

    #[test]
    fn a_second_probe_for_a_published_frame_finds_it_lost() {
        let mut o = out(8);
        for _ in 0..5 {
            send(&mut o, 1);
        }
        o.apply(2, 2);
        assert_eq!(o.probed(2, 100, 1_000), None, "the first probe only arms");
        assert_eq!(o.probed(2, 900, 1_100), None, "sent before we read the first: may predate the publish");
        assert_eq!(o.probed(2, 1_050, 1_200), None, "before the re-armed one was read: still may");
        assert_eq!(o.probed(2, 1_250, 1_300), Some((2, 5)));
        assert_eq!((o.undelivered, o.processed), (Some(2), 2));
        assert_eq!(o.probed(5, 2_000, 2_100), None, "waiting for what was never sent");
        assert_eq!(o.probe, None);
        assert_eq!(o.probed(1, 2_000, 2_100), None, "committed already");
    }

    #[test]
    fn replay_after_a_consumer_restart() {
        let mut o = out(8);
        for _ in 0..6 {
            send(&mut o, 1);
        }
        o.apply(6, 2);
        assert!(!o.replay(3));
        assert_eq!((o.processed, o.undelivered), (4, Some(4)));
        assert_eq!(o.due(0.0, true), Some(2..4), "retained 2..5: seqs 4 and 5 go again");
        let mut lossy = OutBooks::<u64>::new(false, 8, 1 << 20, 0, 0, false);
        lossy.assign(false);
        lossy.assign(true);
        assert!(lossy.replay(-1), "a lossy edge repeats its end of stream");
        assert_eq!(lossy.processed, 1);
    }

    #[test]
    fn consumer_takes_in_order_and_drops_duplicates_and_gaps() {
        let mut i = InBooks::new(true, 8, 1 << 20, 0);
        assert_eq!(i.accept(0, false, 100, 0.0), Accept::Take);
        assert_eq!(i.accept(0, false, 100, 0.0), Accept::Duplicate);
        assert!(i.dup_pending);
        assert_eq!(i.accept(2, false, 100, 1.0), Accept::Gap);
        assert_eq!(i.accept(3, false, 100, 2.0), Accept::Gap);
        assert_eq!(i.gap_since, Some(1.0), "the gap's age counts from the first frame beyond it");
        assert_eq!(i.gap_to_report(1.01, 0.05, 0.2), None, "too young");
        assert_eq!(i.gap_to_report(1.06, 0.05, 0.2), Some(1));
        assert_eq!(i.gap_to_report(1.1, 0.05, 0.2), None, "reported just now");
        assert_eq!(i.accept(1, false, 100, 3.0), Accept::Take);
        assert_eq!(i.gap_since, None);
        assert_eq!(i.accept(1, true, 0, 3.0), Accept::Take, "an end of stream is never a duplicate");
        assert_eq!((i.eos, i.eos_seq), (true, Some(1)));
        let mut lossy = InBooks::new(false, 8, 1 << 20, 0);
        assert_eq!(lossy.accept(3, false, 10, 0.0), Accept::Take);
        assert_eq!((lossy.dropped, lossy.expected), (3, 4));
    }

    #[test]
    fn the_window_shrinks_for_big_frames_and_acks_wake_only_a_producer_that_may_wait() {
        let mut i = InBooks::new(true, 8, 1000, 0);
        i.accept(0, false, 400, 0.0);
        assert_eq!((i.window, i.notify_every), (3, 1), "1000 bytes hold 3 frames of 400 (rounded up)");
        let mut hot = InBooks::new(true, 8, 1000, 0);
        hot.took(0);
        hot.sized(400);
        assert_eq!(hot.window, 3, "frames decoded by the subscriber size the window too");
        let mut j = InBooks::new(true, 8, 1 << 20, 0);
        for s in 0..4 {
            j.accept(s, false, 10, 0.0);
        }
        assert_eq!(j.ack(2, 0, false, || false), Some(Wake::No), "a quarter window: no wake-up");
        assert_eq!(j.ack(2, 0, false, || false), None, "nothing new");
        assert_eq!(j.ack(4, 0, false, || true), Some(Wake::Flow), "half a window with frames queued: if it waits for room");
        assert_eq!(j.ack(4, 1, false, || false), Some(Wake::Always), "a commit always wakes it");
        assert_eq!(j.ack(4, 1, true, || false), Some(Wake::Always), "forced");
        j.dup_pending = true;
        assert_eq!(j.ack(4, 1, false, || false), Some(Wake::Always), "after a duplicate: the producer must learn our position");
    }

    #[test]
    fn a_consumer_that_ended_is_never_waited_for() {
        // A producer restarted before the consumer's final commit reached it: the consumer
        // committed 0..=2 and its end of stream (3 frames + EOS = 4), then exited.
        let mut b: OutBooks<()> = OutBooks::new(true, 4, 1 << 20, 0, 3, false);
        for _ in 0..3 {
            assert!(matches!(b.assign(false), Assign::Skip(_)));
        }
        b.apply(4, 4); // (the relayed final commit)
        assert_eq!(b.assign(true), Assign::Send(4), "without knowing it ended: an EOS past its end");
        b.keep(Kept { seq: 4, nbytes: 0, loaned: false, frame: () });
        assert!(!b.fully_acked(), "... that nobody will ever ack");
        b.consumer_ended();
        assert!(b.fully_acked() && b.has_room() && b.committed == b.next_seq);
        assert_eq!(b.assign(false), Assign::Skip(5), "a frame regenerated beyond its end: skipped");
        for _ in 0..10 {
            b.assign(false);
        }
        assert!(b.has_room() && b.fully_acked() && b.committed == b.next_seq, "and never waits for room");
    }
}
