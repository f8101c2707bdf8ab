//! Gradient buckets for the NCCL all-reduce, fixed at plan time.
//!
//! A data-parallel step on NCCL does not wait for the whole backward pass before it reduces: the
//! flat gradient buffer is cut into contiguous buckets, and each bucket's all-reduce is queued on
//! a second (communication) stream as soon as the last backward call that writes into it has been
//! queued on the compute stream (an event recorded after that call, which the communication stream
//! waits on). The reductions of the late layers' gradients (the classifier's, written first) then
//! run while the early layers' backward still computes. The overflow check and the update wait on
//! the last bucket's event.
//!
//! Everything here is host-side and derived from the resolved calls themselves (the gradient
//! operands each call writes), not from the plan's bookkeeping, so [`check_buckets`] proves the
//! schedule against what the kernels will really touch: every gradient element is in exactly one
//! bucket, no bucket is reduced before its last write, and nothing reads the gradients before the
//! last reduction is waited for.

use anyhow::{bail, Result};
use std::cmp::Reverse;
use std::ops::Range;

use super::calls::{Call, Calls};
use crate::gpu::DevPtr;

/// The default bucket size (`--bucket-mib`): large enough that NCCL's per-call latency does not
/// show, small enough that the first reduction starts early in the backward pass (the size
/// PyTorch's DDP also defaults to).
pub const DEFAULT_BUCKET_MIB: usize = 25;

/// Fp32 gradient elements in a bucket of `mib` MiB (at least one).
pub fn bucket_elems(mib: f64) -> usize {
    ((mib * (1 << 20) as f64 / 4.0) as usize).max(1)
}

/// One bucket: elements `start..start + len` of the device gradient buffer, reduced once the
/// training call at index `after` has been queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub start: usize,
    pub len: usize,
    pub after: usize,
}

impl Bucket {
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// A training program's buckets in launch order, and the call before which the compute stream
/// waits for the last of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketPlan {
    pub buckets: Vec<Bucket>,
    pub wait_before: usize,
}

/// A gradient write of one call: elements of the gradient buffer and the call's index.
#[derive(Clone, Debug)]
struct Write {
    elems: Range<usize>,
    call: usize,
}

/// The fp32 gradient operands a call writes, as (address, elements). Only the weight-gradient
/// calls write parameter gradients; every other call leaves the buffer alone.
pub fn grad_operands(call: &Call) -> Vec<(DevPtr, usize)> {
    match call {
        Call::ConvWgrad(c) => {
            let k = c.s.conv;
            vec![(c.dw, k.cout * k.kh * k.kw * k.cin)]
        }
        Call::BnBackward(c) => vec![(c.dgamma, c.a.c), (c.dbeta, c.a.c)],
        Call::LinearBackwardWeight(c) => vec![(c.dw, c.out_f * c.in_f), (c.db, c.out_f)],
        _ => vec![],
    }
}

/// Whether a call reads the gradient buffer (the overflow check and the update).
fn reads_grads(call: &Call) -> bool {
    matches!(call, Call::OverflowCheck(_) | Call::Rmsprop(_))
}

/// Every gradient write of `calls` in elements of the buffer at `grads` (`len` elements); an
/// operand outside the buffer is an error.
fn writes(calls: &Calls, grads: DevPtr, len: usize) -> Result<Vec<Write>> {
    let mut out = Vec::new();
    for (i, (stage, call)) in calls.iter().enumerate() {
        for (ptr, n) in grad_operands(call) {
            let bytes = ptr.wrapping_sub(grads) as usize;
            if ptr < grads || !bytes.is_multiple_of(4) || bytes / 4 + n > len {
                bail!(
                    "call {i} ({stage:?}) writes a gradient at {ptr:#x} ({n} elements) outside the \
                     gradient buffer at {grads:#x} ({len} elements)"
                );
            }
            out.push(Write {
                elems: bytes / 4..bytes / 4 + n,
                call: i,
            });
        }
    }
    Ok(out)
}

/// The first call that reads the gradients: the reductions must be complete before it.
fn first_reader(calls: &Calls) -> Result<usize> {
    match calls.iter().position(|(_, c)| reads_grads(c)) {
        Some(i) => Ok(i),
        None => bail!("the program has no call that reads the gradients (no update)"),
    }
}

/// Cuts the gradient buffer at `grads` (`len` elements) into buckets of at least `target`
/// elements (the last may be smaller), walking from the end of the buffer, where backward
/// writes first; cuts fall only where a gradient tensor starts, so no tensor is split. Each
/// bucket is reduced after the last call that writes into it, and buckets are launched in that
/// order (the same on every rank: NCCL needs every rank to issue its collectives alike).
pub fn plan_buckets(calls: &Calls, grads: DevPtr, len: usize, target: usize) -> Result<BucketPlan> {
    if target == 0 {
        bail!("a gradient bucket must hold at least one element");
    }
    let writes = writes(calls, grads, len)?;
    let mut starts: Vec<usize> = writes.iter().map(|w| w.elems.start).collect();
    starts.sort_unstable();
    starts.dedup();
    // Cut points from the end: a bucket closes at a tensor's start once it holds `target`.
    let mut ranges = Vec::new();
    let mut end = len;
    for &s in starts.iter().rev() {
        if s > 0 && end - s >= target {
            ranges.push(s..end);
            end = s;
        }
    }
    if end > 0 {
        ranges.push(0..end);
    }
    let mut buckets = Vec::with_capacity(ranges.len());
    for r in ranges {
        let after = writes
            .iter()
            .filter(|w| overlaps(&w.elems, &r))
            .map(|w| w.call)
            .max();
        let Some(after) = after else {
            bail!("gradient elements {r:?} are written by no backward call: nothing to reduce");
        };
        buckets.push(Bucket {
            start: r.start,
            len: r.len(),
            after,
        });
    }
    buckets.sort_by_key(|b| (b.after, Reverse(b.start)));
    let plan = BucketPlan {
        buckets,
        wait_before: first_reader(calls)?,
    };
    check_buckets(calls, grads, len, &plan)?;
    Ok(plan)
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Proves a bucket schedule against the calls, on the host: the buckets tile the gradient
/// buffer (every element in exactly one), each is reduced only after the last call writing into
/// it has been queued, they launch in order of their trigger, and the first call reading the
/// gradients comes after every trigger and is where the compute stream waits.
pub fn check_buckets(calls: &Calls, grads: DevPtr, len: usize, plan: &BucketPlan) -> Result<()> {
    check_tiling(&plan.buckets, len)?;
    let writes = writes(calls, grads, len)?;
    for (k, b) in plan.buckets.iter().enumerate() {
        if b.after >= calls.len() {
            bail!(
                "bucket {k} is triggered after call {} of {}",
                b.after,
                calls.len()
            );
        }
        let late = writes
            .iter()
            .find(|w| w.call > b.after && overlaps(&w.elems, &b.range()));
        if let Some(w) = late {
            bail!(
                "bucket {k} (elements {:?}) is reduced after call {} ({:?}), but call {} ({:?}) \
                 writes elements {:?} into it later",
                b.range(),
                b.after,
                calls[b.after].0,
                w.call,
                calls[w.call].0,
                w.elems
            );
        }
    }
    if let Some(k) =
        (1..plan.buckets.len()).find(|&k| plan.buckets[k].after < plan.buckets[k - 1].after)
    {
        bail!("bucket {k} is launched before an earlier bucket's trigger: launch order must follow the triggers");
    }
    let reader = first_reader(calls)?;
    let last = plan.buckets.iter().map(|b| b.after).max().unwrap_or(0);
    if plan.wait_before > reader || plan.wait_before <= last {
        bail!(
            "the update waits for the buckets before call {}, but the last bucket is triggered \
             after call {last} and the gradients are first read by call {reader} ({:?})",
            plan.wait_before,
            calls[reader].0
        );
    }
    Ok(())
}

/// The buckets, sorted by start, must tile `0..len` with no gap and no overlap.
fn check_tiling(buckets: &[Bucket], len: usize) -> Result<()> {
    let mut sorted: Vec<Bucket> = buckets.to_vec();
    sorted.sort_by_key(|b| b.start);
    let mut next = 0;
    for b in &sorted {
        if b.len == 0 {
            bail!("an empty bucket at element {}", b.start);
        }
        if b.start > next {
            bail!("gradient elements {next}..{} are in no bucket", b.start);
        }
        if b.start < next {
            bail!(
                "gradient elements {}..{} are in two buckets",
                b.start,
                next.min(b.start + b.len)
            );
        }
        next = b.start + b.len;
    }
    if next != len {
        bail!("gradient elements {next}..{len} are in no bucket");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_and_an_overlap_are_caught() {
        let b = |start, len| Bucket {
            start,
            len,
            after: 0,
        };
        assert!(check_tiling(&[b(0, 4), b(4, 6)], 10).is_ok());
        let gap = check_tiling(&[b(0, 4), b(5, 5)], 10).unwrap_err();
        assert!(gap.to_string().contains("4..5 are in no bucket"), "{gap}");
        let twice = check_tiling(&[b(0, 5), b(4, 6)], 10).unwrap_err();
        assert!(twice.to_string().contains("in two buckets"), "{twice}");
        let short = check_tiling(&[b(0, 4)], 10).unwrap_err();
        assert!(short.to_string().contains("4..10"), "{short}");
    }

    #[test]
    fn bucket_sizes_in_mib() {
        assert_eq!(bucket_elems(25.0), 25 << 18);
        assert_eq!(bucket_elems(0.0), 1);
    }
}
