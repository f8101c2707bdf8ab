//! The NCCL gradient sync's code path on the emulated GPU, with a stand-in NCCL (compiled here:
//! one rank, each all-reduce logged and otherwise the identity, as a sum over one rank is).
//! Training steps queued through the buckets (events, the communication stream, the wait before
//! the update, the graph capture) must give bit-identical state and losses to the same steps
//! without a gradient sync, and every step must all-reduce the whole gradient buffer, bucket by
//! bucket, in place. In-process (it sets the driver and NCCL variables before the first load),
//! so it has a test binary of its own.

#[path = "common/emu_env.rs"]
mod emu_env;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use inception_engine::backend::cuda::grad_sync::GradSync;
use inception_engine::backend::cuda::CudaTrainer;
use inception_engine::backend::{Amp, Backend, Images};
use inception_engine::dist::Single;
use inception_engine::optim::{LossScaler, RmsProp, RmsPropConfig};
use inception_engine::params::ModelState;
use inception_engine::plan::{self, PlanConfig};
use std::path::Path;
use std::process::Command;

const STAND_IN: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef struct { char internal[128]; } ncclUniqueId;
int ncclGetVersion(int *v) { *v = 22703; return 0; }
int ncclGetUniqueId(ncclUniqueId *id) { memset(id->internal, 7, 128); return 0; }
int ncclCommInitRank(void **comm, int n, ncclUniqueId id, int rank) {
    if (n != 1 || rank != 0 || id.internal[5] != 7) return 4; /* ncclInvalidArgument */
    *comm = (void *)0x1;
    return 0;
}
int ncclAllReduce(const void *s, void *r, size_t count, int type, int op, void *comm, void *st) {
    FILE *f = fopen(getenv("NCCL_STAND_IN_LOG"), "a");
    fprintf(f, "%d %zu %d %d\n", s == r, count, type, op);
    fclose(f);
    return 0;
}
int ncclCommAbort(void *comm) { return 0; }
"#;

fn build_stand_in(dir: &Path) {
    std::fs::write(dir.join("stand_in.c"), STAND_IN).unwrap();
    let ok = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libnccl.so.2", "-o"])
        .arg(dir.join("libnccl.so.2"))
        .arg(dir.join("stand_in.c"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "the C compiler could not build the NCCL stand-in");
}

/// Every float the trainer holds after `steps` steps of `tiny`, the losses, and the buckets per
/// step; `nccl`: with the NCCL sync in buckets of that many elements.
fn train(spec: &str, nccl: Option<usize>, steps: u64) -> (Vec<Vec<f32>>, Vec<f32>, usize) {
    // SAFETY of the environment change: this binary runs one test, on one thread.
    std::env::set_var("INCEPTION_KERNELS", spec);
    let config = PlanConfig {
        batch: 4,
        image_size: 32,
        num_classes: 10,
        dropout: 0.5,
        ..PlanConfig::default()
    };
    let plan = plan::build("tiny", config).unwrap();
    let model = ModelState::init(&plan, 7);
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    let mut trainer = CudaTrainer::new(plan.clone(), model, optim, Amp::O2).unwrap();
    if let Some(elems) = nccl {
        trainer = trainer.with_nccl(&Single, elems).unwrap();
    }
    let mut scaler = LossScaler::for_amp(Amp::O2);
    let mut losses = Vec::new();
    for step in 0..steps {
        let images: Vec<f32> = (0..plan.tensor(plan.input).numel())
            .map(|i| ((i as u64 * 7919 + step * 104729) % 255) as f32 / 255.0 - 0.5)
            .collect();
        let labels = [step as u32 % 10, 3, 7, (step as u32 + 5) % 10];
        let settled = trainer
            .train_step(Images::F32(&images), &labels, step, 0.01, &mut scaler)
            .unwrap();
        losses.extend(settled.iter().map(|o| o.loss));
    }
    losses.extend(trainer.settle(&mut scaler).unwrap().iter().map(|o| o.loss));
    let buckets = match trainer.grad_sync() {
        GradSync::Nccl(s) => s.buckets().unwrap().buckets.len(),
        _ => 0,
    };
    let (model, optim) = trainer.state().unwrap();
    let state = vec![model.params, model.states, optim.ms, optim.mom];
    (state, losses, buckets)
}

/// The log's all-reduces as (in place, count, dtype, op).
fn logged(log: &Path) -> Vec<(u32, usize, u32, u32)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    std::fs::remove_file(log).ok();
    text.lines()
        .map(|l| {
            let f: Vec<usize> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            (f[0] as u32, f[1], f[2] as u32, f[3] as u32)
        })
        .collect()
}

#[test]
fn steps_through_the_nccl_buckets_equal_steps_without_a_sync() {
    if !emu_env::nvrtc_available("the NCCL path on the emulated GPU") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build_stand_in(dir.path());
    let log = dir.path().join("allreduce.log");
    std::env::set_var("INCEPTION_NCCL_HOME", dir.path());
    std::env::set_var("NCCL_STAND_IN_LOG", &log);
    std::env::set_var("INCEPTION_CUDA_DRIVER", inception_emu::driver_path());
    if let Some(home) = emu_env::cuda_home() {
        std::env::set_var("INCEPTION_CUDA_HOME", home);
    }
    let steps = 3;
    let (alone, alone_losses, _) = train("lean,-graph", None, steps);
    assert_eq!(alone_losses.len(), steps as usize);
    let grads = {
        let config = PlanConfig {
            batch: 4,
            image_size: 32,
            num_classes: 10,
            ..PlanConfig::default()
        };
        let plan = plan::build("tiny", config).unwrap();
        inception_engine::params::ParamLayout::new(&plan).param_len
    };
    for spec in ["lean,-graph", "lean"] {
        let (synced, losses, buckets) = train(spec, Some(512), steps);
        assert!(buckets > 2, "{spec}: {buckets} buckets");
        assert_eq!(losses, alone_losses, "{spec}: step losses");
        for ((a, b), name) in alone
            .iter()
            .zip(&synced)
            .zip(["weights", "BN", "ms", "mom"])
        {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{spec}: {name} differ with the NCCL sync");
        }
        let calls = logged(&log);
        // Called at each step, or once when the graph captured them (the emulated GPU runs a
        // library call at capture, not at replay).
        let rounds = if spec.contains("-graph") {
            steps as usize
        } else {
            1
        };
        assert_eq!(calls.len(), rounds * buckets, "{spec}: {calls:?}");
        for round in calls.chunks(buckets) {
            let covered: usize = round.iter().map(|c| c.1).sum();
            // The device buffer is the padded slots: at least every gradient.
            assert!(
                covered >= grads,
                "{spec}: {covered} of {grads} gradients reduced"
            );
            // In place, fp32 (ncclFloat32 = 7), sum (ncclSum = 0).
            assert!(
                round.iter().all(|c| (c.0, c.2, c.3) == (1, 7, 0)),
                "{round:?}"
            );
        }
    }
}
