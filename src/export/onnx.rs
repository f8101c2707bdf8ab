//! ONNX export of a plan's inference network.
//!
//! The exported graph takes a normalised NCHW float32 image batch named `input`
//! (`[N, 3, S, S]`, N symbolic unless a batch size is fixed) and returns `logits` (`[N, K]`).
//! Every plan op maps to one standard ONNX op (opset 17), so the model computes exactly the
//! engine's inference function: BatchNormalization in inference mode with the running
//! statistics, AveragePool with `count_include_pad=0`, Concat on channels, GlobalAveragePool +
//! Flatten, and Gemm with `transB=1` for the `[out, in]` FC weight. Dropout is the identity in
//! inference and is left out; the loss node is dropped.

use super::ohwi_to_oihw;
use super::onnx_proto::*;
use crate::checkpoint::CheckpointMeta;
use crate::params::ModelState;
use crate::plan::{Conv2d, Node, Op, Plan, Pool, TensorId};
use anyhow::{bail, Context, Result};
use prost::Message;
use std::path::Path;

/// ONNX IR version 8 goes with opset 17, which every onnxruntime since 1.13 runs.
pub const IR_VERSION: i64 = 8;
pub const OPSET: i64 = 17;
pub const INPUT_NAME: &str = "input";
pub const OUTPUT_NAME: &str = "logits";

/// Build the ONNX model of `plan` with the weights of `model`. `batch` fixes the batch dimension;
/// `None` leaves it symbolic (`N`).
pub fn to_model(
    plan: &Plan,
    model: &ModelState,
    meta: &CheckpointMeta,
    batch: Option<usize>,
) -> Result<ModelProto> {
    let mut e = Emitter::new(plan, model);
    for node in &plan.nodes {
        e.node(node)?;
    }
    let n = match batch {
        Some(b) => DimensionValue::DimValue(b as i64),
        None => DimensionValue::DimParam("N".into()),
    };
    let s = plan.config.image_size as i64;
    let k = plan.config.num_classes as i64;
    let graph = GraphProto {
        node: e.nodes,
        name: Some(format!("inception-engine-{}", plan.name)),
        initializer: e.initializers,
        input: vec![value_info(INPUT_NAME, &[n.clone(), dim(3), dim(s), dim(s)])],
        output: vec![value_info(OUTPUT_NAME, &[n, dim(k)])],
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("inception-engine".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        model_version: Some(meta.step as i64),
        doc_string: Some(DOC.into()),
        graph: Some(graph),
        metadata_props: metadata(plan, meta),
        ..Default::default()
    })
}

const DOC: &str = "InceptionV4 inference exported by inception-engine. Input 'input': float32 \
NCHW [N, 3, S, S], RGB scaled to [0, 1] then normalised per channel with the mean and std in the \
metadata. Output 'logits': float32 [N, classes], before softmax.";

/// Encode and write `model` to `path`.
pub fn write(model: &ModelProto, path: &Path) -> Result<()> {
    // Protobuf messages cannot exceed 2 GiB; larger models would need ONNX external data.
    let len = model.encoded_len();
    if len >= i32::MAX as usize {
        bail!("the ONNX model would be {len} bytes, over protobuf's 2 GiB limit");
    }
    std::fs::write(path, model.encode_to_vec())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The preprocessing contract, so a runtime user needs nothing but the .onnx file.
fn metadata(plan: &Plan, meta: &CheckpointMeta) -> Vec<StringStringEntryProto> {
    let p = &meta.preprocessing;
    let pairs = [
        ("input_name", INPUT_NAME.to_string()),
        ("input_layout", "NCHW".to_string()),
        ("input_dtype", "float32".to_string()),
        ("color_order", "RGB".to_string()),
        ("pixel_scale", "x / 255 then (x - mean) / std".to_string()),
        ("image_size", plan.config.image_size.to_string()),
        ("mean", json(&p.mean)),
        ("std", json(&p.std)),
        ("resize", p.resize.clone()),
        ("output_name", OUTPUT_NAME.to_string()),
        (
            "output",
            "logits (apply softmax for probabilities)".to_string(),
        ),
        ("num_classes", plan.config.num_classes.to_string()),
        ("class_names", json(&meta.class_names)),
        ("plan", plan.name.clone()),
        ("step", meta.step.to_string()),
    ];
    pairs
        .into_iter()
        .map(|(k, v)| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        })
        .collect()
}

/// JSON of plain values (numbers, strings), which cannot fail.
fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("plain values serialise")
}

fn dim(v: i64) -> DimensionValue {
    DimensionValue::DimValue(v)
}

fn value_info(name: &str, dims: &[DimensionValue]) -> ValueInfoProto {
    let shape = TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                value: Some(d.clone()),
            })
            .collect(),
    };
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: Some(DATA_TYPE_FLOAT),
                shape: Some(shape),
            }),
        }),
        doc_string: None,
    }
}

/// Walks the plan's nodes, naming ONNX values after plan tensors.
struct Emitter<'a> {
    plan: &'a Plan,
    model: &'a ModelState,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// The ONNX value holding each plan tensor; a dropout output aliases its input.
    names: Vec<String>,
}

impl<'a> Emitter<'a> {
    fn new(plan: &'a Plan, model: &'a ModelState) -> Self {
        let mut names: Vec<String> = plan.tensors.iter().map(|t| t.name.clone()).collect();
        names[plan.input] = INPUT_NAME.into();
        names[plan.logits] = OUTPUT_NAME.into();
        Emitter {
            plan,
            model,
            nodes: Vec::new(),
            initializers: Vec::new(),
            names,
        }
    }

    fn node(&mut self, node: &Node) -> Result<()> {
        match &node.op {
            Op::Conv2d(c) => self.conv(node, c),
            Op::BatchNorm { eps, .. } => self.batchnorm(node, *eps),
            Op::Relu => self.emit(node, "Relu", self.ins(&node.inputs), vec![]),
            Op::MaxPool(p) => self.emit(node, "MaxPool", self.ins(&node.inputs), pool_attrs(p)),
            Op::AvgPool(p) => {
                let mut attrs = pool_attrs(p);
                attrs.push(int("count_include_pad", 0));
                self.emit(node, "AveragePool", self.ins(&node.inputs), attrs)
            }
            Op::GlobalAvgPool => self.global_pool(node),
            Op::Concat => self.emit(node, "Concat", self.ins(&node.inputs), vec![int("axis", 1)]),
            Op::Dropout { .. } => {
                // Identity in inference: later nodes read the dropout's input directly.
                let x = *node.inputs.first().context("dropout without input")?;
                if node.outputs[0] == self.plan.logits {
                    bail!("cannot export a plan whose logits come straight from dropout");
                }
                self.names[node.outputs[0]] = self.names[x].clone();
            }
            Op::Linear { .. } => self.linear(node),
            Op::SoftmaxCrossEntropy { .. } => {}
        }
        Ok(())
    }

    fn ins(&self, ids: &[TensorId]) -> Vec<String> {
        ids.iter().map(|&t| self.names[t].clone()).collect()
    }

    /// Add a node reading `inputs` and writing the plan node's first output.
    fn emit(&mut self, node: &Node, op: &str, inputs: Vec<String>, attrs: Vec<AttributeProto>) {
        let name = node.name.clone();
        self.emit_named(node, &name, op, inputs, attrs);
    }

    fn push(
        &mut self,
        name: &str,
        op: &str,
        inputs: Vec<String>,
        output: String,
        attrs: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![output],
            name: Some(name.into()),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        });
    }

    /// Store a parameter or state tensor as an initializer named after it.
    fn initializer(&mut self, t: TensorId, layout_oihw: bool) -> String {
        let tensor = self.plan.tensor(t);
        let data = self
            .model
            .param(&tensor.name)
            .or_else(|| self.model.state(&tensor.name))
            .expect("every plan parameter and state is in the model layout");
        let (data, dims) = if layout_oihw {
            let s = &tensor.shape;
            (ohwi_to_oihw(data, s), vec![s[0], s[3], s[1], s[2]])
        } else {
            (data.to_vec(), tensor.shape.clone())
        };
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(DATA_TYPE_FLOAT),
            name: Some(tensor.name.clone()),
            raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        });
        tensor.name.clone()
    }

    fn conv(&mut self, node: &Node, c: &Conv2d) {
        let w = self.initializer(node.params[0], true);
        let mut inputs = self.ins(&node.inputs);
        inputs.push(w);
        let attrs = vec![
            ints("kernel_shape", &[c.kh, c.kw]),
            ints("strides", &[c.stride, c.stride]),
            // ONNX pads are all begins then all ends: [top, left, bottom, right].
            ints("pads", &[c.pad_top, c.pad_left, c.pad_bottom, c.pad_right]),
            ints("dilations", &[1, 1]),
            int("group", 1),
        ];
        self.emit(node, "Conv", inputs, attrs);
    }

    fn batchnorm(&mut self, node: &Node, eps: f32) {
        let mut inputs = self.ins(&node.inputs);
        for &t in node.params.iter().chain(&node.state) {
            inputs.push(self.initializer(t, false));
        }
        self.emit(
            node,
            "BatchNormalization",
            inputs,
            vec![float("epsilon", eps)],
        );
    }

    /// GlobalAveragePool keeps the 1x1 spatial dims; Flatten gives the plan's `[n, c]`.
    fn global_pool(&mut self, node: &Node) {
        let pooled = format!("{}.nchw", self.names[node.outputs[0]]);
        let inputs = self.ins(&node.inputs);
        self.push(
            &node.name,
            "GlobalAveragePool",
            inputs,
            pooled.clone(),
            vec![],
        );
        let flat = format!("{}.flatten", node.name);
        self.emit_named(node, &flat, "Flatten", vec![pooled], vec![int("axis", 1)]);
    }

    fn emit_named(
        &mut self,
        node: &Node,
        name: &str,
        op: &str,
        inputs: Vec<String>,
        attrs: Vec<AttributeProto>,
    ) {
        let out = self.names[node.outputs[0]].clone();
        self.push(name, op, inputs, out, attrs);
    }

    fn linear(&mut self, node: &Node) {
        let mut inputs = self.ins(&node.inputs);
        for &t in &node.params {
            inputs.push(self.initializer(t, false));
        }
        self.emit(node, "Gemm", inputs, vec![int("transB", 1)]);
    }
}

fn pool_attrs(p: &Pool) -> Vec<AttributeProto> {
    vec![
        ints("kernel_shape", &[p.k, p.k]),
        ints("strides", &[p.stride, p.stride]),
        ints("pads", &[p.pad; 4]),
    ]
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(ATTR_INT),
        i: Some(v),
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(ATTR_FLOAT),
        f: Some(v),
        ..Default::default()
    }
}

fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(ATTR_INTS),
        ints: v.iter().map(|&x| x as i64).collect(),
        ..Default::default()
    }
}
