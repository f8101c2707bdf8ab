//! AVX2 versions of the loader's plane operations (see mod.rs), with the scalar path's arithmetic:
//! separate multiply and add, no fused rounding, so both give the same bytes.

use std::arch::x86_64::*;

/// `v = clamp(f * v + m, 0, 255)` over the whole plane.
#[target_feature(enable = "avx2")]
pub unsafe fn blend_const(p: &mut [f32], f: f32, m: f32) {
    let (vf, vm) = (_mm256_set1_ps(f), _mm256_set1_ps(m));
    let (lo, hi) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0));
    let n8 = p.len() / 8 * 8;
    let ptr = p.as_mut_ptr();
    let mut i = 0;
    while i < n8 {
        let v = _mm256_loadu_ps(ptr.add(i));
        let v = _mm256_add_ps(_mm256_mul_ps(vf, v), vm);
        _mm256_storeu_ps(ptr.add(i), _mm256_min_ps(_mm256_max_ps(v, lo), hi));
        i += 8;
    }
    for v in &mut p[n8..] {
        *v = (f * *v + m).clamp(0.0, 255.0);
    }
}

/// Saturation over the first multiple of eight pixels; returns how many it did.
#[target_feature(enable = "avx2")]
pub unsafe fn saturate(r: &mut [f32], g: &mut [f32], b: &mut [f32], f: f32) -> usize {
    let n8 = r.len().min(g.len()).min(b.len()) / 8 * 8;
    let (vf, vk) = (_mm256_set1_ps(f), _mm256_set1_ps(1.0 - f));
    let (wr, wg, wb) = (
        _mm256_set1_ps(0.299),
        _mm256_set1_ps(0.587),
        _mm256_set1_ps(0.114),
    );
    let (lo, hi) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0));
    let (pr, pg, pb) = (r.as_mut_ptr(), g.as_mut_ptr(), b.as_mut_ptr());
    let mut i = 0;
    while i < n8 {
        let (vr, vg, vb) = (
            _mm256_loadu_ps(pr.add(i)),
            _mm256_loadu_ps(pg.add(i)),
            _mm256_loadu_ps(pb.add(i)),
        );
        let grey = _mm256_add_ps(
            _mm256_add_ps(_mm256_mul_ps(wr, vr), _mm256_mul_ps(wg, vg)),
            _mm256_mul_ps(wb, vb),
        );
        let m = _mm256_mul_ps(vk, grey);
        let c = |v: __m256| _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        _mm256_storeu_ps(pr.add(i), c(_mm256_add_ps(_mm256_mul_ps(vf, vr), m)));
        _mm256_storeu_ps(pg.add(i), c(_mm256_add_ps(_mm256_mul_ps(vf, vg), m)));
        _mm256_storeu_ps(pb.add(i), c(_mm256_add_ps(_mm256_mul_ps(vf, vb), m)));
        i += 8;
    }
    n8
}

/// `pshufb` masks that gather channel `ch` of 16 RGB pixels from the 16-byte block `o` of
/// their 48 bytes (-128: no byte from this block).
const fn load_mask(ch: usize, o: usize) -> [i8; 16] {
    let mut m = [-128i8; 16];
    let mut t = 0;
    while t < 16 {
        let g = 3 * t + ch;
        if g >= 16 * o && g < 16 * o + 16 {
            m[t] = (g - 16 * o) as i8;
        }
        t += 1;
    }
    m
}

/// The masks that place pixel bytes of channel `ch` into the 16-byte output block `o`.
const fn store_mask(o: usize, ch: usize) -> [i8; 16] {
    let mut m = [-128i8; 16];
    let mut t = 0;
    while t < 16 {
        let g = 16 * o + t;
        if g % 3 == ch {
            m[t] = (g / 3) as i8;
        }
        t += 1;
    }
    m
}

const LOAD: [[[i8; 16]; 3]; 3] = {
    let mut m = [[[0i8; 16]; 3]; 3];
    let mut ch = 0;
    while ch < 3 {
        let mut o = 0;
        while o < 3 {
            m[ch][o] = load_mask(ch, o);
            o += 1;
        }
        ch += 1;
    }
    m
};

const STORE: [[[i8; 16]; 3]; 3] = {
    let mut m = [[[0i8; 16]; 3]; 3];
    let mut o = 0;
    while o < 3 {
        let mut ch = 0;
        while ch < 3 {
            m[o][ch] = store_mask(o, ch);
            ch += 1;
        }
        o += 1;
    }
    m
};

#[inline(always)]
unsafe fn mask(m: &[i8; 16]) -> __m128i {
    _mm_loadu_si128(m.as_ptr() as *const __m128i)
}

/// Splits 16 pixels at a time of an RGB row into planes; returns the pixels done.
#[target_feature(enable = "avx2")]
pub unsafe fn load_row(row: &[u8], r: &mut [f32], g: &mut [f32], b: &mut [f32]) -> usize {
    let n16 = (row.len() / 3).min(r.len()).min(g.len()).min(b.len()) / 16 * 16;
    let src = row.as_ptr();
    let planes = [r.as_mut_ptr(), g.as_mut_ptr(), b.as_mut_ptr()];
    let mut i = 0;
    while i < n16 {
        let blocks = [
            _mm_loadu_si128(src.add(3 * i) as *const __m128i),
            _mm_loadu_si128(src.add(3 * i + 16) as *const __m128i),
            _mm_loadu_si128(src.add(3 * i + 32) as *const __m128i),
        ];
        for (ch, dst) in planes.iter().enumerate() {
            let bytes = _mm_or_si128(
                _mm_or_si128(
                    _mm_shuffle_epi8(blocks[0], mask(&LOAD[ch][0])),
                    _mm_shuffle_epi8(blocks[1], mask(&LOAD[ch][1])),
                ),
                _mm_shuffle_epi8(blocks[2], mask(&LOAD[ch][2])),
            );
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
            _mm256_storeu_ps(dst.add(i), lo);
            _mm256_storeu_ps(dst.add(i + 8), hi);
        }
        i += 16;
    }
    n16
}

/// Sixteen values in 0..=255 rounded to bytes.
#[inline(always)]
unsafe fn to_bytes(p: *const f32) -> __m128i {
    let half = _mm256_set1_ps(0.5);
    let a = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_loadu_ps(p), half));
    let b = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_loadu_ps(p.add(8)), half));
    let a16 = _mm_packus_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    let b16 = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_packus_epi16(a16, b16)
}

/// Interleaves 16 pixels at a time of the planes (values in 0..=255) into an RGB row,
/// rounded; returns the pixels done.
#[target_feature(enable = "avx2")]
pub unsafe fn store_row(r: &[f32], g: &[f32], b: &[f32], row: &mut [u8]) -> usize {
    let n16 = (row.len() / 3).min(r.len()).min(g.len()).min(b.len()) / 16 * 16;
    let dst = row.as_mut_ptr();
    let mut i = 0;
    while i < n16 {
        let ch = [
            to_bytes(r.as_ptr().add(i)),
            to_bytes(g.as_ptr().add(i)),
            to_bytes(b.as_ptr().add(i)),
        ];
        for (o, m) in STORE.iter().enumerate() {
            let block = _mm_or_si128(
                _mm_or_si128(
                    _mm_shuffle_epi8(ch[0], mask(&m[0])),
                    _mm_shuffle_epi8(ch[1], mask(&m[1])),
                ),
                _mm_shuffle_epi8(ch[2], mask(&m[2])),
            );
            _mm_storeu_si128(dst.add(3 * i + 16 * o) as *mut __m128i, block);
        }
        i += 16;
    }
    n16
}

/// The sum of the grey values of the first multiple of eight pixels, and how many.
#[target_feature(enable = "avx2")]
pub unsafe fn grey_sum(r: &[f32], g: &[f32], b: &[f32]) -> (f64, usize) {
    let n8 = r.len().min(g.len()).min(b.len()) / 8 * 8;
    let (wr, wg, wb) = (
        _mm256_set1_ps(0.299),
        _mm256_set1_ps(0.587),
        _mm256_set1_ps(0.114),
    );
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n8 {
        let grey = _mm256_add_ps(
            _mm256_add_ps(
                _mm256_mul_ps(wr, _mm256_loadu_ps(r.as_ptr().add(i))),
                _mm256_mul_ps(wg, _mm256_loadu_ps(g.as_ptr().add(i))),
            ),
            _mm256_mul_ps(wb, _mm256_loadu_ps(b.as_ptr().add(i))),
        );
        acc = _mm256_add_ps(acc, grey);
        i += 8;
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    (lanes.iter().map(|&v| v as f64).sum(), n8)
}
