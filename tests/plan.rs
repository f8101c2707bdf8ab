//! The plans: v4's exact size and cost, the backward derivation, and the memory planner.

use inception_engine::plan::memory::{lifetimes, plan_memory};
use inception_engine::plan::{backward::derive, build, Op, PlanConfig};

fn v4(image_size: usize, batch: usize) -> inception_engine::plan::Plan {
    build(
        "v4",
        PlanConfig {
            image_size,
            batch,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn v4_params_and_macs_match_timm() {
    let p = v4(299, 1);
    assert_eq!(p.param_count(), 42_679_816);
    assert_eq!(p.macs_per_image(), 12_253_974_624);
    assert_eq!(v4(75, 1).macs_per_image(), 430_394_464);
    assert_eq!(v4(96, 1).macs_per_image(), 731_407_200);
    assert_eq!(p.shape(p.logits), &[1, 1000]);
}

#[test]
fn v4_has_the_149_convolutions_of_the_reference_table_in_order() {
    let table = include_str!("fixtures/v4-conv-layers.tsv");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("name"))
        .map(|l| l.split('\t').collect())
        .collect();
    let p = v4(299, 1);
    let convs: Vec<_> = p
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv2d(_)))
        .collect();
    assert_eq!(convs.len(), rows.len());
    for (node, row) in convs.iter().zip(&rows) {
        let Op::Conv2d(g) = node.op else {
            unreachable!()
        };
        let y = p.shape(node.outputs[0]);
        let got = [
            g.cin, g.cout, g.kh, g.kw, g.stride, g.pad_top, g.pad_left, y[1], y[2],
        ];
        let want: Vec<usize> = [1, 4, 5, 6, 7, 8, 9, 10, 11]
            .iter()
            .map(|&i| row[i].parse().unwrap())
            .collect();
        assert_eq!(node.name, row[0]);
        assert_eq!(got.to_vec(), want, "{}", node.name);
    }
}

#[test]
fn image_sizes_below_75_are_rejected_clearly() {
    assert!(build(
        "v4",
        PlanConfig {
            image_size: 75,
            ..Default::default()
        }
    )
    .is_ok());
    let err = build(
        "v4",
        PlanConfig {
            image_size: 74,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("too small"), "{err}");
    assert!(build("v5", PlanConfig::default()).is_err());
}

#[test]
fn num_classes_changes_only_the_head() {
    let p = build(
        "v4",
        PlanConfig {
            num_classes: 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p.param_count(), 42_679_816 - 1536 * 990 - 990);
}

#[test]
fn backward_accumulates_gradients_of_tensors_with_several_consumers() {
    let p = build(
        "tiny",
        PlanConfig {
            batch: 2,
            image_size: 31,
            num_classes: 5,
            ..Default::default()
        },
    )
    .unwrap();
    let b = derive(&p);
    let consumers = p.consumers();
    for (t, cons) in consumers.iter().enumerate() {
        let Some(g) = b.grad_of[t] else { continue };
        let writes: Vec<bool> = b
            .steps
            .iter()
            .flat_map(|s| {
                s.grad_inputs
                    .iter()
                    .zip(&s.accumulate)
                    .filter(|(gi, _)| **gi == Some(g))
                    .map(|(_, &a)| a)
            })
            .collect();
        assert_eq!(
            writes.len(),
            cons.len(),
            "{}: one gradient write per consumer",
            p.tensors[t].name
        );
        assert!(
            !writes[0] && writes[1..].iter().all(|&a| a),
            "{}: first write overwrites, the rest accumulate",
            p.tensors[t].name
        );
    }
    // The concat input of a.cat feeds four branches.
    let x = p.find("mixed3.cat.out").unwrap();
    assert_eq!(consumers[x].len(), 4);
    // Every parameter-owning node has a backward step, and the input image needs no gradient.
    assert_eq!(b.steps.len(), p.nodes.len());
    assert!(b.grad_of[p.input].is_none());
}

#[test]
fn memory_plan_never_overlaps_live_tensors() {
    for plan in [
        build(
            "tiny",
            PlanConfig {
                batch: 3,
                image_size: 40,
                num_classes: 7,
                ..Default::default()
            },
        )
        .unwrap(),
        v4(299, 1),
    ] {
        let b = derive(&plan);
        let m = plan_memory(&plan, &b, |_| 4);
        let life = lifetimes(&plan, &b);
        assert!(m.placements.len() > 10);
        for (i, a) in m.placements.iter().enumerate() {
            assert_eq!(Some(a.life), life[a.tensor]);
            assert_eq!(a.offset % 256, 0);
            for c in &m.placements[i + 1..] {
                let disjoint = a.offset + a.bytes <= c.offset || c.offset + c.bytes <= a.offset;
                assert!(
                    !a.life.overlaps(&c.life) || disjoint,
                    "tensors {} and {} overlap while both alive",
                    a.tensor,
                    c.tensor
                );
            }
        }
        assert!(
            m.peak_bytes < m.total_bytes / 2,
            "reuse should at least halve the arena: {} vs {}",
            m.peak_bytes,
            m.total_bytes
        );
        assert!(m.peak_bytes >= m.placements.iter().map(|p| p.bytes).max().unwrap());
    }
}
