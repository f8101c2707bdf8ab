//! The model table: every row builds at its self-test shapes and agrees with `plan::build`, names
//! are unique, and unknown names and models without timm fail with errors that say what exists.

use clap::Parser;
use inception_engine::cli::inspect;
use inception_engine::export::timm::{self, ImportOptions};
use inception_engine::params::ModelState;
use inception_engine::plan::models::{self, StepShape, MODELS};
use inception_engine::plan::{self, Plan, PlanConfig};
use std::collections::BTreeSet;

fn config(s: StepShape) -> PlanConfig {
    PlanConfig {
        batch: s.batch,
        image_size: s.image_size,
        num_classes: s.classes,
        ..Default::default()
    }
}

/// What identifies a plan's graph: its name, tensors and node count.
fn fingerprint(p: &Plan) -> (String, Vec<(String, Vec<usize>)>, usize) {
    let tensors = p.tensors.iter().map(|t| (t.name.clone(), t.shape.clone()));
    (p.name.clone(), tensors.collect(), p.nodes.len())
}

#[test]
fn every_row_builds_at_its_selftest_shapes_as_plan_build_does() {
    for m in MODELS {
        let shapes = [Some(m.selftest.full), m.selftest.reduced];
        for s in shapes.into_iter().flatten() {
            let own = (m.build)(config(s)).unwrap_or_else(|e| panic!("{}: {e:#}", m.name));
            let by_name = plan::build(m.name, config(s)).unwrap();
            assert_eq!(own.name, m.name, "a plan is named after its row");
            assert_eq!(own.shape(own.logits), &[s.batch, s.classes], "{}", m.name);
            assert_eq!(fingerprint(&own), fingerprint(&by_name), "{}", m.name);
        }
    }
}

#[test]
fn names_are_unique_and_the_default_is_a_row() {
    let names = models::names();
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), MODELS.len());
    assert_eq!(models::find(models::DEFAULT).unwrap().name, models::DEFAULT);
}

#[test]
fn an_unknown_name_lists_the_known_ones() {
    for err in [
        format!("{:#}", models::find("v5").unwrap_err()),
        format!(
            "{:#}",
            plan::build("v5", PlanConfig::default()).unwrap_err()
        ),
    ] {
        assert!(err.contains("'v5'"), "{err}");
        for name in models::names() {
            assert!(err.contains(name), "{name} missing: {err}");
        }
    }
}

#[test]
fn the_plan_flag_defaults_to_the_table_and_rejects_unknown_names() {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: inspect::Args,
    }
    let default = Cli::try_parse_from(["inspect"]).unwrap();
    assert_eq!(default.args.plan, models::DEFAULT);
    let err = Cli::try_parse_from(["inspect", "--plan", "v5"])
        .err()
        .unwrap()
        .to_string();
    for name in models::names() {
        assert!(err.contains(name), "{name} missing: {err}");
    }
}

#[test]
fn a_model_without_timm_cannot_be_imported_or_exported() {
    let Some(m) = MODELS.iter().find(|m| m.timm_name.is_none()) else {
        return;
    };
    let want = format!("model {} has no timm counterpart", m.name);
    let opts = ImportOptions {
        plan: m.name.to_string(),
        ..Default::default()
    };
    let err = format!("{:#}", timm::import(&[], &opts).unwrap_err());
    assert!(err.contains(&want), "{err}");
    let plan = (m.build)(config(m.selftest.full)).unwrap();
    let model = ModelState::init(&plan, 0);
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("timm.safetensors");
    let err = format!("{:#}", timm::export(&plan, &model, 0, &path).unwrap_err());
    assert!(err.contains(&want), "{err}");
    assert!(!path.exists());
}
