//! Which implementation of each leaner-step change a CUDA step uses: the new (lean) path or the
//! one it replaced (baseline). Every change stays selectable so that one GPU visit can time both
//! (`bench kernels --kernels baseline,lean`, `bench train --kernels ...`) and a regression can be
//! bisected to one change.
//!
//! `INCEPTION_KERNELS` picks them for any command: `lean` (the default), `baseline`, or a start
//! followed by changes to it, comma-separated: `lean,-graph` (everything new except the CUDA
//! graph), `baseline,+bn_vec` (only the vectorised batchnorm).

use anyhow::{bail, Result};
use serde::Serialize;

/// One switch per change of the leaner step; `true` runs the new path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct KernelPaths {
    /// Stride-2 data gradients split by stride phase into sub-GEMMs over their own taps.
    pub dgrad_phase: bool,
    /// The 3-channel stem's weight gradient on the tensor cores over its 8-channel padded input.
    pub stem_wgrad_tc: bool,
    /// The batch uploaded as u8 on a copy stream into double-buffered device images, normalised
    /// on the device.
    pub u8_input: bool,
    /// Batchnorm with vectorised accesses and its finalise launches merged.
    pub bn_vec: bool,
    /// Max-pool saves the argmax in the forward and the backward scatters through it.
    pub pool_argmax: bool,
    /// Narrow tensor-core tiles for convolutions whose GEMM N is small.
    pub narrow_tiles: bool,
    /// The training step replayed as one captured CUDA graph.
    pub graph: bool,
}

/// The switches' names, as `INCEPTION_KERNELS` and `--kernels` spell them.
pub const NAMES: [&str; 7] = [
    "dgrad_phase",
    "stem_wgrad_tc",
    "u8_input",
    "bn_vec",
    "pool_argmax",
    "narrow_tiles",
    "graph",
];

impl KernelPaths {
    /// Every change on.
    pub const LEAN: KernelPaths = KernelPaths {
        dgrad_phase: true,
        stem_wgrad_tc: true,
        u8_input: true,
        bn_vec: true,
        pool_argmax: true,
        narrow_tiles: true,
        graph: true,
    };

    /// Every change off: the step as it was before the leaner-step work.
    pub const BASELINE: KernelPaths = KernelPaths {
        dgrad_phase: false,
        stem_wgrad_tc: false,
        u8_input: false,
        bn_vec: false,
        pool_argmax: false,
        narrow_tiles: false,
        graph: false,
    };

    fn switch(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "dgrad_phase" => &mut self.dgrad_phase,
            "stem_wgrad_tc" => &mut self.stem_wgrad_tc,
            "u8_input" => &mut self.u8_input,
            "bn_vec" => &mut self.bn_vec,
            "pool_argmax" => &mut self.pool_argmax,
            "narrow_tiles" => &mut self.narrow_tiles,
            "graph" => &mut self.graph,
            _ => return None,
        })
    }

    /// Parses `lean`, `baseline`, or either followed by `,+name` / `,-name` items.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut items = spec.split(',').map(str::trim);
        let mut paths = match items.next().unwrap_or("") {
            "lean" => Self::LEAN,
            "baseline" => Self::BASELINE,
            other => bail!(
                "kernel paths '{spec}': must start with 'lean' or 'baseline', not '{other}' \
                 (e.g. 'lean,-graph' or 'baseline,+bn_vec')"
            ),
        };
        for item in items {
            let (on, name) = match item.split_at_checked(1) {
                Some(("+", name)) => (true, name),
                Some(("-", name)) => (false, name),
                _ => bail!("kernel paths '{spec}': '{item}' must be +name or -name"),
            };
            match paths.switch(name) {
                Some(v) => *v = on,
                None => bail!(
                    "kernel paths '{spec}': unknown change '{name}' (known: {})",
                    NAMES.join(", ")
                ),
            }
        }
        Ok(paths)
    }

    /// From `INCEPTION_KERNELS` (lean when unset).
    pub fn from_env() -> Result<Self> {
        match std::env::var("INCEPTION_KERNELS") {
            Ok(spec) => Self::parse(&spec).map_err(|e| e.context("reading INCEPTION_KERNELS")),
            Err(_) => Ok(Self::LEAN),
        }
    }

    /// The shortest spec that parses back to these paths (`lean`, `baseline`, or one of them
    /// with the differing switches), for logs and benchmark tables.
    pub fn spec(&self) -> String {
        let from = |start: &str, base: KernelPaths| {
            let mut s = start.to_string();
            for name in NAMES {
                let (mut a, mut b) = (*self, base);
                let (on, base_on) = (*a.switch(name).unwrap(), *b.switch(name).unwrap());
                if on != base_on {
                    s += if on { ",+" } else { ",-" };
                    s += name;
                }
            }
            s
        };
        let (lean, base) = (from("lean", Self::LEAN), from("baseline", Self::BASELINE));
        if lean.len() <= base.len() {
            lean
        } else {
            base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        assert_eq!(KernelPaths::parse("lean").unwrap(), KernelPaths::LEAN);
        assert_eq!(
            KernelPaths::parse("baseline").unwrap(),
            KernelPaths::BASELINE
        );
        let p = KernelPaths::parse("lean,-graph").unwrap();
        assert!(!p.graph && p.bn_vec);
        assert_eq!(p.spec(), "lean,-graph");
        let p = KernelPaths::parse("baseline, +bn_vec").unwrap();
        assert!(p.bn_vec && !p.graph);
        assert_eq!(p.spec(), "baseline,+bn_vec");
        assert_eq!(KernelPaths::LEAN.spec(), "lean");
        assert_eq!(KernelPaths::BASELINE.spec(), "baseline");
    }

    #[test]
    fn bad_specs_are_errors_that_name_the_problem() {
        let e = KernelPaths::parse("fast").unwrap_err().to_string();
        assert!(e.contains("'fast'"), "{e}");
        let e = KernelPaths::parse("lean,+warp").unwrap_err().to_string();
        assert!(e.contains("unknown change 'warp'"), "{e}");
        let e = KernelPaths::parse("lean,graph").unwrap_err().to_string();
        assert!(e.contains("+name or -name"), "{e}");
    }
}
