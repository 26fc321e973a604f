//! A database's history: which restore points are kept, and what a
//! restore to a moment applies. Pure decisions over the manifest and a
//! listing; `line` deletes, `restore` fetches.
//!
//! Every point of the last [`RECENT_MS`] is kept (the newest base at or
//! before its start and the spans and segments that bring it there, every
//! base after it, and every segment and span after those), then one point
//! per UTC hour for `days`: the newest point of the hour that bases and the
//! spans and segments kept for it reach. The newest base is always kept.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use crate::sqlite::line::{BaseRef, SegRef};

/// How far back every restore point is kept: the hour the docs promise,
/// and a margin for a prune that runs late.
const RECENT_MS: u64 = 65 * 60_000;
pub const HOUR_MS: u64 = 3_600_000;
/// More segments than any span merges (a bound for names read from S3).
const MAX_SPAN: u64 = 1 << 16;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Retention's two boundaries at a moment, for databases and files alike:
/// every restore point after `recent` is kept, and one per hour back to
/// `horizon`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub recent: u64,
    pub horizon: u64,
}

impl Window {
    /// At `now` (Unix ms), keeping hourly points for `days`.
    pub fn at(now: u64, days: u32) -> Window {
        Window {
            recent: now.saturating_sub(RECENT_MS),
            horizon: now.saturating_sub(u64::from(days) * DAY_MS),
        }
    }
}

/// What a prune keeps of a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keep {
    /// Newest first, as the manifest lists them.
    pub bases: Vec<BaseRef>,
    /// Per generation, the segments after this number are kept.
    segments_after: BTreeMap<String, u64>,
    /// Segments and spans (generation, first, last number, time) a kept
    /// point is built from.
    chains: BTreeSet<(String, u64, u64, Option<u64>)>,
}

impl Keep {
    pub fn segment(&self, gen: &str, seg: &SegRef) -> bool {
        self.segments_after.get(gen).is_some_and(|&a| seg.seq > a)
            || self
                .chains
                .contains(&(gen.to_owned(), seg.first, seg.seq, seg.t_ms))
    }

    /// Whether the base stored at `name` (below the line's path) is kept.
    pub fn base_object(&self, name: &str) -> bool {
        self.bases.iter().any(|b| b.object() == name)
    }
}

/// What to keep of `bases` and `segs` (a listing: generation and segment or
/// span, any order) at `now` (Unix ms), keeping hourly points for `days`.
/// Bases are rare (`backup::base_due`), so an hourly point is mostly a base
/// and the spans after it: those are kept, and the segments under them go.
pub fn retain(bases: &[BaseRef], segs: &[(String, SegRef)], now: u64, days: u32) -> Keep {
    let mut sorted = bases.to_vec();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.taken_ms()));
    let mut by_gen: BTreeMap<&str, Vec<SegRef>> = BTreeMap::new();
    for (gen, seg) in segs {
        by_gen.entry(gen).or_default().push(seg.clone());
    }
    let chain_to = |b: &BaseRef, at: u64| {
        let segs = by_gen.get(b.gen.as_str()).map_or(&[][..], Vec::as_slice);
        segments_to(b, segs, Some(at)).0
    };
    let Window { recent, horizon } = Window::at(now, days);
    // The newest base at or before the recent window's start: points in
    // the window just after that start are built on it, through the
    // spans and segments up to that start, then every later one.
    let anchor = sorted
        .iter()
        .position(|b| b.taken_ms() <= recent)
        .unwrap_or(sorted.len().saturating_sub(1));
    let mut kept: Vec<BaseRef> = sorted.iter().take(anchor + 1).cloned().collect();
    let mut chains = BTreeSet::new();
    let mut segments_after = BTreeMap::new();
    for (i, b) in kept.iter().enumerate() {
        let mut after = b.after;
        if i == anchor {
            let chain = chain_to(b, recent);
            after = chain.last().map_or(after, |s| s.seq);
            chains.extend(
                chain
                    .into_iter()
                    .map(|s| (b.gen.clone(), s.first, s.seq, s.t_ms)),
            );
        }
        let a = segments_after.entry(b.gen.clone()).or_insert(after);
        *a = (*a).min(after);
    }
    // An hour's point is where its last moment restores to; an hour whose
    // last moment restores to an earlier hour's point has none of its own.
    for hour in horizon / HOUR_MS..=recent / HOUR_MS {
        let end = ((hour + 1) * HOUR_MS - 1).min(recent);
        let Ok(b) = base_at(&sorted, end) else {
            continue;
        };
        let chain = chain_to(b, end);
        let point = chain.last().and_then(|s| s.t_ms).unwrap_or(b.taken_ms());
        if point < horizon || point / HOUR_MS != hour {
            continue;
        }
        if !kept.contains(b) {
            kept.push(b.clone());
        }
        chains.extend(
            chain
                .into_iter()
                .map(|s| (b.gen.clone(), s.first, s.seq, s.t_ms)),
        );
    }
    kept.sort_by_key(|b| std::cmp::Reverse(b.taken_ms()));
    Keep {
        bases: kept,
        segments_after,
        chains,
    }
}

/// Why applying segments stopped before the moment asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// This number is missing while later ones are there.
    Missing(u64),
    /// A segment written before segments were timed: its moment is unknown.
    Untimed(String),
    /// This segment could not be read or applied, and why.
    Failed(String, String),
    /// Two segments carry this number: two writers (an upload in flight
    /// when the lease was taken over). Neither is applied.
    Twice(u64),
}

/// The newest base taken at or before `at`; `Err` with the oldest point
/// when `at` is before every base.
pub fn base_at(bases: &[BaseRef], at: u64) -> Result<&BaseRef, Option<u64>> {
    bases
        .iter()
        .filter(|b| b.taken_ms() <= at)
        .max_by_key(|b| b.taken_ms())
        .ok_or_else(|| bases.iter().map(BaseRef::taken_ms).min())
}

/// The segments of `base`'s generation to apply onto it, in order: from
/// `base.after` on without a gap, up to the last read at or before `at`
/// (`None`: the newest). `segs` are the generation's segments and spans in
/// any order. Where a span starts at or before the next number and is
/// within the moment, the one reaching furthest is taken instead of its
/// segments: each of its pages is as its last segment wrote it, so it is
/// right on any state from its first segment on.
pub fn segments_to(
    base: &BaseRef,
    segs: &[SegRef],
    at: Option<u64>,
) -> (Vec<SegRef>, Option<Stop>) {
    let within = |s: &SegRef| match (at, s.t_ms) {
        (Some(at), Some(t)) => t <= at,
        (Some(_), None) => false,
        (None, _) => true,
    };
    let mut by_seq: BTreeMap<u64, Vec<&SegRef>> = BTreeMap::new();
    let mut spans = Vec::new();
    // How far any span reaches, within the moment or not (for a hole).
    let mut spans_reach = 0;
    for s in segs.iter().filter(|s| s.seq > base.after) {
        if s.is_span() {
            if s.seq - s.first <= MAX_SPAN {
                spans_reach = spans_reach.max(s.seq);
                if within(s) {
                    spans.push(s);
                }
            }
        } else {
            by_seq.entry(s.seq).or_default().push(s);
        }
    }
    let twice: BTreeSet<u64> = by_seq
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(&n, _)| n)
        .collect();
    // Spans start to count once the next number reaches their first: kept
    // by how far they reach, so each step looks at the furthest only (a
    // retention pass plans every hour of a week of spans).
    spans.sort_by_key(|s| s.first);
    let mut waiting = 0;
    let mut open: BinaryHeap<(u64, usize)> = BinaryHeap::new();
    let mut apply = Vec::new();
    let mut done = base.after;
    loop {
        let next = done + 1;
        let here = by_seq.get(&next).map_or(&[][..], Vec::as_slice);
        if here.len() > 1 {
            return (apply, Some(Stop::Twice(next)));
        }
        while let Some(s) = spans.get(waiting).filter(|s| s.first <= next) {
            open.push((s.seq, waiting));
            waiting += 1;
        }
        // A span over a number two writers wrote is not taken either; nor,
        // since the next number only grows, ever after.
        let once = |s: &SegRef| twice.range(next..=s.seq).next().is_none();
        let span = loop {
            match open.peek() {
                Some(&(seq, _)) if seq < next => {
                    open.pop();
                }
                Some(&(_, i)) if !once(spans[i]) => {
                    open.pop();
                }
                Some(&(_, i)) => break Some(spans[i]),
                None => break None,
            }
        };
        let s = match (span, here.first()) {
            (Some(span), _) => span,
            (None, Some(s)) if within(s) => *s,
            (None, Some(s)) if s.t_ms.is_none() => {
                return (apply, Some(Stop::Untimed(s.name.clone())))
            }
            (None, Some(_)) => break,
            // A hole is reported even when what follows it is too new:
            // what is missing may have been older than `at`.
            (None, None) if by_seq.range(next..).next().is_some() || spans_reach > next => {
                return (apply, Some(Stop::Missing(next)))
            }
            (None, None) => break,
        };
        apply.push(s.clone());
        done = s.seq;
    }
    (apply, None)
}

/// What can be restored of one database, from its manifest and a listing
/// of its objects: `cvm-init history`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// The oldest moment it can be restored to (Unix ms).
    pub oldest: Option<u64>,
    /// From here on, every uploaded change is a restore point.
    pub continuous_from: Option<u64>,
    /// The newest restore point.
    pub newest: Option<u64>,
    /// Hours before `continuous_from` that hold a restore point.
    pub hourly_points: usize,
    /// When the base stock rclone restores was taken.
    pub stock_base: Option<u64>,
    pub objects: usize,
    pub bytes: u64,
}

/// `objects`: (generation, segment) for every segment listed, and the
/// listing's object count and bytes.
pub fn summarize(
    bases: &[BaseRef],
    segments: &[(String, SegRef)],
    objects: usize,
    bytes: u64,
) -> Summary {
    let mut sorted = bases.to_vec();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.taken_ms()));
    // Every change is a point only where its segment is there: a span's
    // inner segments, once pruned, are not.
    let mut by_gen: BTreeMap<&str, BTreeMap<u64, Option<u64>>> = BTreeMap::new();
    let mut tops: BTreeMap<&str, u64> = BTreeMap::new();
    for (gen, s) in segments {
        let top = tops.entry(gen).or_default();
        *top = (*top).max(s.seq);
        if !s.is_span() {
            by_gen.entry(gen).or_default().insert(s.seq, s.t_ms);
        }
    }
    let present = |gen: &str, n: u64| by_gen.get(gen).is_some_and(|s| s.contains_key(&n));
    let top = |gen: &str| tops.get(gen).copied().unwrap_or(0);
    // Walking back from the newest base: each whose segments are all there
    // up to its generation's newest extends the continuous range.
    let continuous = sorted
        .iter()
        .take_while(|b| (b.after + 1..=top(&b.gen)).all(|n| present(&b.gen, n)))
        .count();
    let newest_segment = segments.iter().filter_map(|(_, s)| s.t_ms).max();
    let newest_base = sorted.first().map(BaseRef::taken_ms);
    let newest = newest_segment.max(newest_base);
    let continuous_from = match (continuous, sorted.first()) {
        (0, Some(b)) => {
            // Not from the newest base: from the first of the segments in
            // a row up to its generation's newest.
            let mut k = top(&b.gen) + 1;
            while k - 1 > b.after && present(&b.gen, k - 1) {
                k -= 1;
            }
            by_gen
                .get(b.gen.as_str())
                .and_then(|s| s.get(&k).copied().flatten())
                .or(newest)
        }
        (n, _) => sorted.get(n.max(1) - 1).map(BaseRef::taken_ms),
    };
    // Before that, one point an hour at most: bases and span ends.
    let before = |t: u64| continuous_from.is_some_and(|c| t < c);
    let hours: BTreeSet<u64> = sorted
        .iter()
        .map(BaseRef::taken_ms)
        .chain(segments.iter().filter_map(|(_, s)| s.t_ms))
        .filter(|&t| before(t))
        .map(|t| t / HOUR_MS)
        .collect();
    Summary {
        oldest: sorted.last().map(BaseRef::taken_ms),
        continuous_from,
        newest,
        hourly_points: hours.len(),
        stock_base: sorted.iter().find(|b| !b.packed).map(BaseRef::taken_ms),
        objects,
        bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::line::parse_segment;

    const MIN: u64 = 60_000;
    /// Midnight UTC, so hours are easy to read.
    const T0: u64 = 1_795_910_400_000;

    fn base(gen: &str, after: u64, at_ms: u64) -> BaseRef {
        BaseRef {
            gen: gen.into(),
            after,
            sha256: String::new(),
            at: at_ms / 1000,
            at_ms,
            packed: false,
            rollback: false,
        }
    }

    fn seg(seq: u64, t: Option<u64>) -> SegRef {
        let name = match t {
            Some(t) => crate::sqlite::line::remote_segment_name(seq, t),
            None => crate::sqlite::line::segment_name(seq),
        };
        parse_segment(&name).unwrap()
    }

    fn afters(k: &Keep) -> Vec<(&str, u64)> {
        k.bases.iter().map(|b| (b.gen.as_str(), b.after)).collect()
    }

    #[test]
    fn the_last_hour_whole_then_one_point_per_hour_for_the_days() {
        // A base every 20 minutes for two days, one generation.
        let bases: Vec<BaseRef> = (0..144)
            .map(|i| base("g", i * 100, T0 + i * 20 * MIN))
            .collect();
        let now = T0 + 48 * 60 * MIN;
        let k = retain(&bases, &[], now, 1);
        // The last 65 minutes: bases at 47:20, 47:40 (and 48:00 is `now`,
        // not taken); the anchor is the newest at or before 46:55: 46:40.
        let newest = bases.last().unwrap().taken_ms();
        assert_eq!(newest, now - 20 * MIN);
        let window: Vec<u64> = k.bases.iter().take(4).map(BaseRef::taken_ms).collect();
        assert_eq!(
            window,
            vec![
                now - 20 * MIN,
                now - 40 * MIN,
                now - 60 * MIN,
                now - 80 * MIN
            ]
        );
        // Then hourly, newest in each hour, back to 24 h ago.
        let hourly: Vec<u64> = k
            .bases
            .iter()
            .skip(4)
            .map(|b| (now - b.taken_ms()) / MIN)
            .collect();
        assert_eq!(
            hourly[0], 140,
            "hour 45's newest (45:40); hour 46 is the anchor's"
        );
        assert!(hourly.windows(2).all(|w| w[1] - w[0] == 60));
        assert!(*hourly.last().unwrap() <= 24 * 60);
        // Segments: only after the window's bases.
        let at = |seq| seg(seq, Some(now));
        assert!(k.segment("g", &at(14_001)) && k.segment("g", &at(14_300)));
        assert!(!k.segment("g", &at(14_000)), "before the anchor");
        assert!(
            !k.segment("other", &at(99_999)),
            "a generation with nothing kept"
        );
        assert!(k.base_object(&bases[140].object()));
        assert!(
            !k.base_object(&bases[139].object()),
            "same hour as a newer kept base"
        );
    }

    /// One base, then a segment a minute for five hours and a span of each
    /// ten (none across an hour): past the recent window, each hour's point
    /// is the base and its spans; the segments under them go.
    #[test]
    fn with_one_base_an_hours_point_is_kept_as_the_spans_that_reach_it() {
        let span = |first: u64, last: u64| {
            parse_segment(&crate::sqlite::line::span_name(
                first,
                last,
                T0 + last * MIN,
            ))
            .unwrap()
        };
        let minute = |n: u64| seg(n, Some(T0 + n * MIN));
        let mut objects: Vec<SegRef> = (1..=300).map(minute).collect();
        for hour in 0..5 {
            let seqs: Vec<u64> = ((hour * 60).max(1)..hour * 60 + 60).collect();
            objects.extend(seqs.chunks(10).map(|c| span(c[0], *c.last().unwrap())));
        }
        let listing = |objects: &[SegRef]| -> Vec<(String, SegRef)> {
            objects
                .iter()
                .map(|s| ("g".to_owned(), s.clone()))
                .collect()
        };
        let bases = [base("g", 0, T0)];
        let now = T0 + 300 * MIN;
        let k = retain(&bases, &listing(&objects), now, 1);
        assert_eq!(k.bases, bases);
        for (s, kept, why) in [
            (span(51, 59), true, "hour 0's point"),
            (span(1, 10), true, "the first span of every chain"),
            (minute(30), false, "under a span, before the recent window"),
            (minute(119), false, "hour 1's end, under its span"),
            (
                span(220, 229),
                true,
                "the recent window's start is built on it",
            ),
            (minute(233), true, "in the chain to the window's start"),
            (minute(237), true, "in the window"),
            (span(230, 239), true, "in the window"),
            (minute(300), true, "the newest"),
        ] {
            assert_eq!(k.segment("g", &s), kept, "{}: {why}", s.name);
        }

        // An hour without spans keeps its segments: its point needs them.
        objects.retain(|s| !(s.is_span() && (60..120).contains(&s.first)));
        let k = retain(&bases, &listing(&objects), now, 1);
        assert!(k.segment("g", &minute(100)) && k.segment("g", &minute(119)));
        assert!(!k.segment("g", &minute(30)));
        // While that base is the newest, its whole chain stays: the newest
        // point needs it. Once a newer base is older than the days, its
        // chain and it go.
        let later = base("g", 300, now);
        let k = retain(&bases, &listing(&objects), now + 2 * DAY_MS, 1);
        assert!(k.segment("g", &span(51, 59)));
        let k = retain(
            &[bases[0].clone(), later.clone()],
            &listing(&objects),
            now + 2 * DAY_MS,
            1,
        );
        assert_eq!(k.bases, [later], "the newest base alone");
        assert!(!k.segment("g", &span(51, 59)) && !k.segment("g", &minute(300)));
    }

    /// A week of the 100 ms load: a span a minute (64 segments) for seven
    /// days on one base, pruned as retention runs hourly: every hour's
    /// point is kept, as spans, and no segment before the recent window.
    #[test]
    fn a_week_of_spans_on_one_base_keeps_each_hours_point() {
        let per_span = 64;
        let minutes = 7 * 24 * 60;
        let now = T0 + minutes * MIN;
        let mut objects: Vec<(String, SegRef)> = (0..minutes)
            .map(|m| {
                let (first, last) = (m * per_span + 1, (m + 1) * per_span);
                let name = crate::sqlite::line::span_name(first, last, T0 + m * MIN + MIN - 1);
                ("g".to_owned(), parse_segment(&name).unwrap())
            })
            .collect();
        // The segments of the last 70 minutes.
        let from = (minutes - 70) * per_span + 1;
        objects.extend((from..=minutes * per_span).map(|n| {
            let t = T0 + (n - 1) / per_span * MIN + MIN - 1;
            ("g".to_owned(), seg(n, Some(t)))
        }));
        let k = retain(&[base("g", 0, T0)], &objects, now, 7);
        let spans_kept = objects
            .iter()
            .filter(|(g, s)| s.is_span() && k.segment(g, s))
            .count();
        assert_eq!(
            spans_kept, minutes as usize,
            "the newest point needs them all"
        );
        let old_segments = objects
            .iter()
            .filter(|(g, s)| !s.is_span() && s.t_ms < Some(now - 66 * MIN) && k.segment(g, s))
            .count();
        assert_eq!(old_segments, 0);
    }

    #[test]
    fn what_retention_always_keeps() {
        let now = T0 + 100 * DAY_MS;
        for (bases, days, want) in [
            // No history days: the newest base alone when it is old.
            (
                vec![base("g", 0, T0), base("g", 5, T0 + HOUR_MS)],
                0,
                vec![("g", 5)],
            ),
            // An old base is the anchor even beyond the days.
            (vec![base("g", 5, T0)], 7, vec![("g", 5)]),
            // A new generation after a reboot: the old one's last base stays
            // the anchor while the new one is within the hour.
            (
                vec![
                    base("a", 9, now - 2 * HOUR_MS),
                    base("b", 0, now - 10 * MIN),
                ],
                0,
                vec![("b", 0), ("a", 9)],
            ),
            (vec![], 7, vec![]),
        ] {
            let k = retain(&bases, &[], now, days);
            assert_eq!(afters(&k), want, "{bases:?}");
        }
        let k = retain(
            &[
                base("a", 9, now - 2 * HOUR_MS),
                base("b", 0, now - 10 * MIN),
            ],
            &[],
            now,
            0,
        );
        assert!(k.segment("a", &seg(10, Some(now))) && k.segment("b", &seg(1, Some(now))));
    }

    #[test]
    fn a_summary_says_from_when_every_change_is_a_point() {
        let bases = [
            base("a", 0, T0),
            base("a", 10, T0 + HOUR_MS),
            base("b", 0, T0 + 2 * HOUR_MS),
            base("b", 4, T0 + 2 * HOUR_MS + 10 * MIN),
        ];
        // Generation a kept from 11 (after its second base), b from 1.
        let mut segs: Vec<(String, SegRef)> = (11..=20)
            .map(|n| ("a".into(), seg(n, Some(T0 + HOUR_MS + n))))
            .collect();
        segs.extend((1..=9).map(|n| ("b".into(), seg(n, Some(T0 + 2 * HOUR_MS + n * MIN)))));
        let s = summarize(&bases, &segs, 23, 1000);
        assert_eq!(s.oldest, Some(T0));
        assert_eq!(s.continuous_from, Some(T0 + HOUR_MS));
        assert_eq!(s.hourly_points, 1);
        assert_eq!(
            s.newest,
            Some(T0 + 2 * HOUR_MS + 10 * MIN),
            "the newest base"
        );
        assert_eq!(s.stock_base, Some(T0 + 2 * HOUR_MS + 10 * MIN));
        // A hole in b: the range starts at b's base after the hole.
        segs.retain(|(g, s)| !(g == "b" && s.seq == 2));
        let s = summarize(&bases, &segs, 22, 900);
        assert_eq!(s.continuous_from, Some(T0 + 2 * HOUR_MS + 10 * MIN));
        assert_eq!(s.hourly_points, 3);
        assert_eq!(summarize(&[], &[], 0, 0).continuous_from, None);
        // A new database's first base has no stock copy.
        let first = BaseRef {
            packed: true,
            ..base("c", 0, T0)
        };
        assert_eq!(summarize(&[first], &[], 2, 100).stock_base, None);
    }

    #[test]
    fn a_restore_takes_the_newest_base_before_the_moment_then_its_segments() {
        let bases = [base("g", 0, T0), base("g", 3, T0 + 10 * MIN)];
        assert_eq!(base_at(&bases, T0 - 1), Err(Some(T0)));
        assert_eq!(base_at(&bases, T0).unwrap().after, 0);
        assert_eq!(base_at(&bases, T0 + 10 * MIN + 5).unwrap().after, 3);
        assert_eq!(base_at(&[], T0), Err(None));

        let b = &bases[0];
        let segs = [
            seg(1, Some(T0 + 1000)),
            seg(3, Some(T0 + 3000)),
            seg(2, Some(T0 + 2000)),
            seg(4, Some(T0 + 4000)),
        ];
        let seqs = |(v, stop): (Vec<SegRef>, Option<Stop>)| {
            (v.iter().map(|s| s.seq).collect::<Vec<_>>(), stop)
        };
        assert_eq!(
            seqs(segments_to(b, &segs, Some(T0 + 2500))),
            (vec![1, 2], None)
        );
        assert_eq!(
            seqs(segments_to(b, &segs, Some(T0 + 2000))),
            (vec![1, 2], None),
            "at its moment: in"
        );
        assert_eq!(seqs(segments_to(b, &segs, Some(T0 + 999))), (vec![], None));
        assert_eq!(seqs(segments_to(b, &segs, None)), (vec![1, 2, 3, 4], None));
        // A hole before the moment: stop there and say which.
        let holed = [seg(1, Some(T0 + 1000)), seg(3, Some(T0 + 3000))];
        assert_eq!(
            seqs(segments_to(b, &holed, Some(T0 + 5000))),
            (vec![1], Some(Stop::Missing(2)))
        );
        assert_eq!(
            seqs(segments_to(b, &holed, Some(T0 + 2500))),
            (vec![1], Some(Stop::Missing(2))),
            "what is missing may be before it"
        );
        // Two writers of one number: neither is taken.
        let twice = [
            seg(1, Some(T0 + 1000)),
            seg(2, Some(T0 + 2000)),
            seg(2, Some(T0 + 2001)),
            seg(3, Some(T0 + 3000)),
        ];
        assert_eq!(
            seqs(segments_to(b, &twice, None)),
            (vec![1], Some(Stop::Twice(2)))
        );
        // Step 1's untimed segments: fine for the latest, not for a moment.
        let old = [seg(1, None), seg(2, None)];
        assert_eq!(seqs(segments_to(b, &old, None)), (vec![1, 2], None));
        assert_eq!(
            seqs(segments_to(b, &old, Some(T0))),
            (vec![], Some(Stop::Untimed("000000000001".into())))
        );
    }
    #[test]
    fn a_restore_takes_the_span_reaching_furthest_within_the_moment() {
        let span = |first: u64, last: u64| {
            parse_segment(&crate::sqlite::line::span_name(
                first,
                last,
                T0 + last * 1000,
            ))
            .unwrap()
        };
        let l0 = |seqs: std::ops::RangeInclusive<u64>| -> Vec<SegRef> {
            seqs.map(|n| seg(n, Some(T0 + n * 1000))).collect()
        };
        let names = |(v, stop): (Vec<SegRef>, Option<Stop>)| {
            let v: Vec<String> = v
                .iter()
                .map(|s| match s.is_span() {
                    true => format!("{}..{}", s.first, s.seq),
                    false => s.seq.to_string(),
                })
                .collect();
            (v.join(" "), stop)
        };
        let all = |extra: &[SegRef]| [l0(1..=12), extra.to_vec()].concat();
        // (base after, objects, moment in seconds after T0, applied, stop)
        type Case<'a> = (u64, Vec<SegRef>, Option<u64>, &'a str, Option<Stop>);
        let cases: Vec<Case> = vec![
            (
                0,
                all(&[span(1, 4), span(5, 8)]),
                None,
                "1..4 5..8 9 10 11 12",
                None,
            ),
            (
                0,
                all(&[span(1, 4), span(1, 8)]),
                None,
                "1..8 9 10 11 12",
                None,
            ),
            // The base is inside a span: the span is right on it.
            (
                2,
                all(&[span(1, 4), span(5, 8)]),
                None,
                "1..4 5..8 9 10 11 12",
                None,
            ),
            // A span after the moment: its segments, up to the moment.
            (0, all(&[span(1, 4), span(5, 8)]), Some(6), "1..4 5 6", None),
            (
                0,
                all(&[span(1, 4), span(5, 8)]),
                Some(8),
                "1..4 5..8",
                None,
            ),
            // Segments pruned or lost under a span: the span stands in.
            (
                0,
                [l0(1..=1), vec![span(1, 8)], l0(9..=10)].concat(),
                None,
                "1..8 9 10",
                None,
            ),
            (
                0,
                [l0(1..=1), vec![span(1, 8)], l0(9..=10)].concat(),
                Some(5),
                "1",
                Some(Stop::Missing(2)),
            ),
            // Spans only, none starting at the next number.
            (0, vec![span(3, 8)], None, "", Some(Stop::Missing(1))),
            // Two writers of 6: no span over it is taken.
            (
                0,
                all(&[span(1, 4), span(5, 8), seg(6, Some(T0 + 6001))]),
                None,
                "1..4 5",
                Some(Stop::Twice(6)),
            ),
        ];
        for (after, objects, at, want, stop) in cases {
            let b = base("g", after, T0);
            assert_eq!(
                names(segments_to(&b, &objects, at.map(|s| T0 + s * 1000))),
                (want.to_owned(), stop),
                "after {after}, at {at:?}"
            );
        }
        // The summary counts a span's end as a point, not its segments.
        let objects: Vec<(String, SegRef)> = [l0(1..=2), vec![span(3, 8)], l0(9..=9)]
            .concat()
            .into_iter()
            .map(|s| ("g".to_owned(), s))
            .collect();
        let bases = [base("g", 0, T0), base("g", 5, T0 + 5000)];
        let s = summarize(&bases, &objects, 5, 0);
        assert_eq!(
            s.continuous_from,
            Some(T0 + 9000),
            "a span's inner segments are no points"
        );
        assert_eq!(s.newest, Some(T0 + 9000));
    }
}
