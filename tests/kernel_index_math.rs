//! CPU ports of the index math of the gather-style backward kernels, checked against brute force:
//! `covering` / `window_count` of kernels/pool.cu and the tap selection of `conv_dgrad_plain` in
//! kernels/conv_plain.cu (stride 2, asymmetric padding, the `(i + pad - k) % stride` test on
//! values that can be negative). C `int` semantics: `/` and `%` truncate toward zero, as in Rust.
//! Keep in sync with the kernels.

/// pool.cu `covering`: output windows o in [lo, hi] whose rows include input row i.
fn covering(i: i32, k: i32, stride: i32, pad: i32, out: i32) -> (i32, i32) {
    let t = i + pad - k + 1;
    let lo = if t <= 0 { 0 } else { (t + stride - 1) / stride };
    let hi = ((i + pad) / stride).min(out - 1);
    (lo, hi)
}

/// pool.cu `window_count` along one axis.
fn count_1d(o: i32, k: i32, stride: i32, pad: i32, size: i32) -> i32 {
    let lo = (o * stride - pad).max(0);
    let hi = (o * stride - pad + k).min(size);
    (hi - lo).max(0)
}

#[test]
fn pool_covering_is_exactly_the_windows_containing_the_input() {
    for size in 1..12 {
        for k in 1..6 {
            for stride in 1..4 {
                for pad in 0..k {
                    if size + 2 * pad < k {
                        continue;
                    }
                    let out = (size + 2 * pad - k) / stride + 1;
                    for i in 0..size {
                        let (lo, hi) = covering(i, k, stride, pad, out);
                        for o in 0..out {
                            let start = o * stride - pad;
                            let inside = start <= i && i < start + k;
                            assert_eq!(
                                inside,
                                lo <= o && o <= hi,
                                "size {size} k {k} s {stride} p {pad} i {i} o {o}"
                            );
                        }
                    }
                    for o in 0..out {
                        let brute = (0..k)
                            .filter(|r| (0..size).contains(&(o * stride - pad + r)))
                            .count() as i32;
                        assert_eq!(count_1d(o, k, stride, pad, size), brute);
                        assert!(brute > 0, "a window entirely in padding");
                    }
                }
            }
        }
    }
}

/// conv_plain.cu `conv_dgrad_plain`: the output position a tap r of input row h reads, if any.
fn dgrad_tap(h: i32, r: i32, pad: i32, stride: i32, out: i32) -> Option<i32> {
    let ohs = h + pad - r;
    if ohs < 0 || ohs % stride != 0 || ohs / stride >= out {
        return None;
    }
    Some(ohs / stride)
}

#[test]
fn conv_dgrad_taps_match_the_forward_windows() {
    for size in 1..12 {
        for k in 1..8 {
            for stride in 1..4 {
                for pad_lo in 0..k {
                    for pad_hi in 0..k {
                        if size + pad_lo + pad_hi < k {
                            continue;
                        }
                        let out = (size + pad_lo + pad_hi - k) / stride + 1;
                        // Forward: output o, tap r reads input o * stride - pad_lo + r.
                        let mut fwd = Vec::new();
                        for o in 0..out {
                            for r in 0..k {
                                let i = o * stride - pad_lo + r;
                                if (0..size).contains(&i) {
                                    fwd.push((i, r, o));
                                }
                            }
                        }
                        let mut bwd = Vec::new();
                        for i in 0..size {
                            for r in 0..k {
                                if let Some(o) = dgrad_tap(i, r, pad_lo, stride, out) {
                                    bwd.push((i, r, o));
                                }
                            }
                        }
                        fwd.sort();
                        assert_eq!(
                            fwd, bwd,
                            "size {size} k {k} s {stride} pads {pad_lo},{pad_hi}"
                        );
                    }
                }
            }
        }
    }
}
