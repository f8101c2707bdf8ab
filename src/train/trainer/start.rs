//! Where a run starts: a fresh model, a checkpoint (`--resume`, `auto` included) with its
//! mid-epoch position, and in a distributed run rank 0's start broadcast to every rank.

// The trainer's types and imports (this is part of its module).
use super::*;

/// Where a run starts: a state to train from, or a run that is already complete.
pub(super) enum Start {
    Done(PathBuf, u64),
    Run(ModelState, RmsProp, Box<RunState>),
}

/// Rank 0's start: the resumed or fresh state (only rank 0 reads checkpoints).
pub(super) fn primary_start(
    cfg: &TrainConfig,
    plan: &Plan,
    scaler: LossScaler,
    steps_per_epoch: usize,
    world: usize,
) -> Result<(Start, Vec<EpochPosition>)> {
    let resume = resume_checkpoint(cfg, plan)?;
    if let Some((path, ckpt)) = &resume {
        if ckpt.meta.epoch as usize >= cfg.epochs && is_auto(cfg) {
            eprintln!(
                "{} is already at epoch {} of {}: the run is complete, nothing to do",
                path.display(),
                ckpt.meta.epoch,
                cfg.epochs
            );
            return Ok((Start::Done(path.clone(), ckpt.meta.step), Vec::new()));
        }
    }
    let (model, optim, run, positions) =
        initial_state(cfg, plan, scaler, resume, steps_per_epoch, world)?;
    Ok((Start::Run(model, optim, Box::new(run)), positions))
}

/// The part of the start that is not a buffer, as rank 0 sends it.
#[derive(Serialize, Deserialize)]
pub(super) struct StartHeader {
    pub(super) done: Option<(PathBuf, u64)>,
    pub(super) step: u64,
    pub(super) epoch: usize,
    pub(super) scaler: LossScaler,
    /// Every rank's epoch position (empty at an epoch boundary).
    pub(super) positions: Vec<EpochPosition>,
    pub(super) tally: TallyState,
}

/// Rank 0's start on every rank: the header, then weights, BN statistics and optimizer state,
/// broadcast before the first step so every rank trains the same model.
pub(super) fn share_start(
    comm: &dyn Comm,
    cfg: &TrainConfig,
    plan: &Plan,
    start: Option<(Start, Vec<EpochPosition>)>,
) -> Result<Start> {
    if comm.world() == 1 {
        return Ok(start.expect("rank 0 has a start").0);
    }
    let mut header = Vec::new();
    let mut state = None;
    if let Some((start, positions)) = start {
        let h = match &start {
            Start::Done(path, step) => StartHeader {
                done: Some((path.clone(), *step)),
                step: *step,
                epoch: 0,
                scaler: LossScaler::None,
                positions,
                tally: TallyState::from(&Tally::default()),
            },
            Start::Run(_, _, run) => StartHeader {
                done: None,
                step: run.step,
                epoch: run.epoch,
                scaler: run.scaler,
                positions,
                tally: TallyState::from(&run.tally),
            },
        };
        header = serde_json::to_vec(&h)?;
        state = Some(start);
    }
    comm.broadcast_bytes(&mut header)?;
    let h: StartHeader = serde_json::from_slice(&header).context("the start sent by rank 0")?;
    if let Some((path, step)) = h.done {
        return Ok(Start::Done(path, step));
    }
    let (mut model, mut optim) = match state {
        Some(Start::Run(model, optim, _)) => (model, optim),
        _ => {
            let model = ModelState::zeros(plan);
            let optim = RmsProp::new(cfg.rmsprop, &model.layout);
            (model, optim)
        }
    };
    for buf in [
        &mut model.params,
        &mut model.states,
        &mut optim.ms,
        &mut optim.mom,
    ] {
        comm.broadcast_f32(buf)?;
    }
    let run = RunState {
        step: h.step,
        epoch: h.epoch,
        scaler: h.scaler,
        position: h.positions.get(comm.rank()).copied().unwrap_or_default(),
        tally: h.tally.into(),
    };
    Ok(Start::Run(model, optim, Box::new(run)))
}

/// Every rank's epoch position, by rank (through a sum: each rank fills its own row).
pub(super) fn gather_positions(comm: &dyn Comm, mine: EpochPosition) -> Result<Vec<EpochPosition>> {
    let world = comm.world();
    let mut table = vec![0.0f64; world * 4];
    let row = [
        mine.batches,
        mine.position,
        mine.skipped,
        mine.good_since_wrap,
    ];
    for (t, v) in table[comm.rank() * 4..].iter_mut().zip(row) {
        *t = v as f64;
    }
    comm.all_reduce_sum_f64(&mut table)?;
    Ok(table
        .chunks(4)
        .map(|r| EpochPosition {
            batches: r[0] as usize,
            position: r[1] as usize,
            skipped: r[2] as usize,
            good_since_wrap: r[3] as usize,
        })
        .collect())
}

pub(super) fn is_auto(cfg: &TrainConfig) -> bool {
    cfg.resume.as_deref() == Some(Path::new(RESUME_AUTO))
}

/// The checkpoint `--resume` names, loaded; for `auto`, the newest one in `--out` that loads
/// (a truncated or corrupt one is skipped with a warning), or None when there is none.
pub(super) fn resume_checkpoint(
    cfg: &TrainConfig,
    plan: &Plan,
) -> Result<Option<(PathBuf, Checkpoint)>> {
    let Some(path) = &cfg.resume else {
        return Ok(None);
    };
    if !is_auto(cfg) {
        return Ok(Some((path.clone(), Checkpoint::load(path)?)));
    }
    let found = if cfg.out.is_dir() {
        checkpoint::list(&cfg.out, CHECKPOINT_PREFIX)?
    } else {
        Vec::new()
    };
    for (_, _, path) in found.into_iter().rev() {
        match Checkpoint::load(&path) {
            Ok(ckpt) => {
                ckpt.check_compatible(plan)
                    .with_context(|| format!("cannot resume from {}", path.display()))?;
                return Ok(Some((path, ckpt)));
            }
            Err(e) => eprintln!("warning: --resume auto skips {}: {e:#}", path.display()),
        }
    }
    eprintln!(
        "--resume auto: no usable checkpoint in {}, starting a new run",
        cfg.out.display()
    );
    Ok(None)
}

/// Fresh weights, or everything a checkpoint holds when resuming.
pub(super) fn initial_state(
    cfg: &TrainConfig,
    plan: &Plan,
    scaler: LossScaler,
    resume: Option<(PathBuf, Checkpoint)>,
    steps_per_epoch: usize,
    world: usize,
) -> Result<(ModelState, RmsProp, RunState, Vec<EpochPosition>)> {
    let mut model = ModelState::init(plan, cfg.seed);
    let mut optim = RmsProp::new(cfg.rmsprop, &ParamLayout::new(plan));
    let Some((path, ckpt)) = resume else {
        return Ok((model, optim, RunState::fresh(scaler), Vec::new()));
    };
    ckpt.check_compatible(plan)
        .with_context(|| format!("cannot resume from {}", path.display()))?;
    if !ckpt.has_optimizer() {
        bail!("{} holds no optimizer state, so training cannot resume from it bit-exactly; start a new run from it with fine-tuning instead", path.display());
    }
    ckpt.apply_to(&mut model, Some(&mut optim))?;
    let m = &ckpt.meta;
    if m.epoch as usize >= cfg.epochs {
        bail!(
            "{} is already at epoch {}: ask for more --epochs to continue",
            path.display(),
            m.epoch
        );
    }
    let (positions, tally) = mid_epoch_state(&ckpt, &path, world)?;
    let position = positions.first().copied().unwrap_or_default();
    if position.batches > 0 {
        let expected = m.epoch * steps_per_epoch as u64 + position.batches as u64;
        if position.batches >= steps_per_epoch || m.step != expected {
            bail!(
                "{} was saved after {} batches of epoch {} (step {}), which does not fit {} steps per epoch: resume mid-epoch with the same data and batch size",
                path.display(),
                position.batches,
                m.epoch + 1,
                m.step,
                steps_per_epoch
            );
        }
        if m.rng.seed != cfg.seed {
            bail!(
                "{} was saved mid-epoch by a run with --seed {}; resuming it needs the same seed (not {}) to continue the same shuffle",
                path.display(),
                m.rng.seed,
                cfg.seed
            );
        }
        say!(
            "resuming from {} in epoch {} after batch {} (step {})",
            path.display(),
            m.epoch + 1,
            position.batches,
            m.step
        );
    } else {
        say!(
            "resuming from {} at epoch {} step {}",
            path.display(),
            m.epoch,
            m.step
        );
    }
    Ok((
        model,
        optim,
        RunState {
            step: m.step,
            epoch: m.epoch as usize,
            scaler: m.loss_scaler,
            position,
            tally,
        },
        positions,
    ))
}

/// The epoch positions (by rank; empty at an epoch boundary) and loss tally a mid-epoch
/// checkpoint records for a run of `world` ranks.
pub(super) fn mid_epoch_state(
    ckpt: &Checkpoint,
    path: &Path,
    world: usize,
) -> Result<(Vec<EpochPosition>, Tally)> {
    let extra = &ckpt.meta.rng.extra;
    let parse = |key: &str| -> Result<Option<serde_json::Value>> {
        extra
            .get(key)
            .map(|v| serde_json::from_str(v))
            .transpose()
            .with_context(|| format!("{}: the entry rng.{key} is invalid", path.display()))
    };
    let positions: Vec<EpochPosition> =
        match (parse(EXTRA_EPOCH_POSITIONS)?, parse(EXTRA_EPOCH_POSITION)?) {
            (Some(all), _) => serde_json::from_value(all)?,
            (None, Some(one)) => vec![serde_json::from_value(one)?],
            (None, None) => Vec::new(),
        };
    if !positions.is_empty() && positions.len() != world {
        bail!(
            "{} was saved mid-epoch by a run of {} process(es); resuming it mid-epoch needs the same number (not {world}), or resume from an epoch-end checkpoint",
            path.display(),
            positions.len()
        );
    }
    let tally = match parse(EXTRA_EPOCH_TALLY)? {
        Some(v) => serde_json::from_value::<TallyState>(v)?.into(),
        None => Tally::default(),
    };
    Ok((positions, tally))
}
