//! Checks every `cuda_launch!` call site against the C parameter list of the kernel it launches,
//! without a GPU: a wrong argument count, order or width is silent undefined behaviour at run
//! time, so it is caught here from the sources.
//!
//! Kernel signatures are parsed from kernels/*.cu (`extern "C" __global__ void name(...)` and the
//! `TC_ENTRY(...)` instantiations). Launch sites are parsed from the Rust launchers: each argument
//! is a local whose type is resolved from the enclosing function's parameters or `let` bindings
//! (`expr as T`, struct literals, `BnArgs` fields). Every argument must resolve, so a new launcher
//! written in a shape this test cannot read fails loudly instead of being skipped.
//!
//! Types are compared by ABI class: 8-byte scalars (pointers, `u64`, `DevPtr`), 4-byte integers
//! (`int`, `u32`, `i32`), `float`/`f32`, and parameter structs by name.
//!
//! Precision variants (`name_o0`, `name_o3` next to the O2 `name`, see kernels/common.cuh) are
//! launched through `amp_kernel([O0, O2, O3])` lists of literals; every literal is a kernel the site
//! may launch and is checked like any other. Further tests keep the variants' ABI equal to their
//! base's, the lists in level order, and every variant reachable from a launcher.

use std::collections::HashMap;
use std::path::Path;

/// The launcher files: every op's `src/ops/<op>/cuda.rs` and the optimizer's `src/optim/cuda.rs`.
fn launcher_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(root().join("src/ops"))
        .unwrap()
        .map(|e| e.unwrap().path().join("cuda.rs"))
        .filter(|p| p.exists())
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    files.push("src/optim/cuda.rs".into());
    files.sort();
    assert!(files.len() >= 10, "found only {files:?}");
    files
}
const STRUCTS: [&str; 3] = ["ConvParams", "PoolParams", "RmspropParams"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Index of the bracket closing the one opening at `open` (strings and char literals skipped).
fn close_of(s: &[u8], open: usize) -> usize {
    let mut depth = 0i32;
    let mut i = open;
    while i < s.len() {
        match s[i] {
            b'"' => {
                i += 1;
                while s[i] != b'"' {
                    if s[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
        i += 1;
    }
    panic!("unbalanced brackets");
}

/// Splits on commas at bracket depth 0.
fn split_top(s: &str) -> Vec<String> {
    let (b, mut out, mut depth, mut start, mut in_str) = (s.as_bytes(), Vec::new(), 0, 0, false);
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'"' if i == 0 || b[i - 1] != b'\\' => in_str = !in_str,
            _ if in_str => {}
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                out.push(s[start..i].trim().to_string());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = s[start..].trim();
    if !last.is_empty() {
        out.push(last.to_string());
    }
    out
}

fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// ABI class of a C parameter declaration such as `const __half* x` or `u64 count`.
fn c_class(decl: &str) -> String {
    if decl.contains('*') {
        return "8".into();
    }
    let words: Vec<&str> = decl.split_whitespace().filter(|w| *w != "const").collect();
    match words[0] {
        "u64" | "size_t" => "8".into(),
        "int" | "u32" | "unsigned" => "4i".into(),
        "float" => "4f".into(),
        s if STRUCTS.contains(&s) => s.into(),
        other => panic!("unknown C parameter type in `{decl}`: {other}"),
    }
}

/// ABI class of a Rust type name.
fn rust_class(ty: &str) -> Option<String> {
    let ty = ty.trim();
    match ty {
        "u64" | "DevPtr" | "usize" | "i64" => Some("8".into()),
        "i32" | "u32" => Some("4i".into()),
        "f32" => Some("4f".into()),
        s if STRUCTS.contains(&s) => Some(s.into()),
        _ => None,
    }
}

/// Kernel name -> ABI classes of its parameters.
fn kernel_signatures() -> HashMap<String, Vec<String>> {
    let mut sigs = HashMap::new();
    for entry in std::fs::read_dir(root().join("kernels")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let src = strip_comments(&std::fs::read_to_string(&path).unwrap());
        let b = src.as_bytes();
        for (pos, _) in src.match_indices("extern \"C\" __global__ void") {
            let mut rest = &src[pos + "extern \"C\" __global__ void".len()..];
            rest = rest.trim_start();
            if rest.starts_with("__launch_bounds__") {
                let open = rest.find('(').unwrap();
                let close = close_of(rest.as_bytes(), open);
                rest = rest[close + 1..].trim_start();
            }
            let open = rest.find('(').unwrap();
            let name = rest[..open].trim().to_string();
            if name == "NAME" {
                continue; // the TC_ENTRY macro body; its instantiations are read below
            }
            let abs_open = b.len() - rest.len() + open;
            let params = &src[abs_open + 1..close_of(b, abs_open)];
            let classes = split_top(params).iter().map(|p| c_class(p)).collect();
            assert!(
                sigs.insert(name.clone(), classes).is_none(),
                "duplicate {name}"
            );
        }
        for (pos, _) in src.match_indices("\nTC_ENTRY(") {
            let open = pos + "\nTC_ENTRY".len();
            let args = split_top(&src[open + 1..close_of(b, open)]);
            sigs.insert(args[0].clone(), vec!["ConvParams".to_string()]);
        }
    }
    sigs
}

/// Field types of `pub field: Type,` declarations (the launch structs, BnArgs and friends). A name
/// declared with types of two different ABI classes (or an unknown one beside another) maps to
/// "?" so it never resolves; `DevPtr` and `u64` fields of one name agree.
fn field_types(files: &[String]) -> HashMap<String, String> {
    let mut f: HashMap<String, String> = HashMap::new();
    for src in files {
        for line in src.lines() {
            let l = line.trim();
            if let Some(rest) = l.strip_prefix("pub ") {
                if let Some((name, ty)) = rest.trim_end_matches(',').split_once(':') {
                    if !name.contains(' ') && !name.contains('(') {
                        let ty = ty.trim().to_string();
                        let e = f.entry(name.trim().to_string()).or_insert(ty.clone());
                        let same =
                            *e == ty || rust_class(e).is_some() && rust_class(e) == rust_class(&ty);
                        if !same {
                            *e = "?".to_string();
                        }
                    }
                }
            }
        }
    }
    f
}

/// The Rust type of an expression bound to a launch argument, if this test can tell.
fn expr_type(
    e: &str,
    body: &str,
    fields: &HashMap<String, String>,
    depth: usize,
) -> Option<String> {
    let e = e.trim();
    if let Some(name) = e.split_whitespace().next() {
        if STRUCTS.contains(&name) && e[name.len()..].trim_start().starts_with('{') {
            return Some(name.to_string());
        }
    }
    if let Some((_, ty)) = e.rsplit_once(" as ") {
        return Some(ty.trim().to_string());
    }
    for suffix in ["i32", "u32", "u64", "f32"] {
        if let Some(num) = e.strip_suffix(suffix) {
            if !num.is_empty() && num.chars().all(|c| c.is_ascii_digit() || c == '_') {
                return Some(suffix.to_string());
            }
        }
    }
    if let Some((_, field)) = e.rsplit_once('.') {
        if field.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return fields.get(field).cloned();
        }
    }
    if e.chars().all(|c| c.is_alphanumeric() || c == '_') && depth < 4 {
        return ident_type(e, body, fields, depth + 1);
    }
    None
}

/// Type of local `id` at the end of `body` (a function from `fn` to the launch): the last `let`
/// binding it, else the function parameter.
fn ident_type(
    id: &str,
    body: &str,
    fields: &HashMap<String, String>,
    depth: usize,
) -> Option<String> {
    let b = body.as_bytes();
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut found = None;
    for (pos, _) in body.match_indices("let ") {
        if pos > 0 && is_word(b[pos - 1]) {
            continue;
        }
        let mut pat_start = pos + 4;
        if body[pat_start..].starts_with("mut ") {
            pat_start += 4;
        }
        let eq = pos + body[pos..].find('=').unwrap();
        let pat = body[pat_start..eq].trim();
        let (pat, annot) = match pat.split_once(':') {
            Some((p, t)) => (p.trim(), Some(t.trim())),
            None => (pat, None),
        };
        // The statement's value: up to the `;` at bracket depth 0.
        let mut end = eq + 1;
        let mut depth_b = 0i32;
        while end < b.len() {
            match b[end] {
                b'(' | b'[' | b'{' => depth_b += 1,
                b')' | b']' | b'}' => depth_b -= 1,
                b';' if depth_b == 0 => break,
                _ => {}
            }
            end += 1;
        }
        let value = body[eq + 1..end.min(b.len())].trim();
        if pat.starts_with('(') {
            let names = split_top(&pat[1..pat.len() - 1]);
            let Some(i) = names.iter().position(|n| n == id) else {
                continue;
            };
            let ty = if let Some(t) = annot {
                split_top(&t[1..t.len() - 1]).get(i).cloned()
            } else if value.starts_with('(') {
                let vals = split_top(&value[1..value.len() - 1]);
                vals.get(i)
                    .and_then(|v| expr_type(v, &body[..pos], fields, depth))
            } else {
                None
            };
            found = Some(ty);
        } else if pat == id {
            found = Some(
                annot
                    .map(str::to_string)
                    .or_else(|| expr_type(value, &body[..pos], fields, depth)),
            );
        }
    }
    if let Some(t) = found {
        return t;
    }
    // Function parameter `id: Type`.
    let sig_end = body.find('{').unwrap_or(body.len());
    let sig = &body[..sig_end];
    let mut from = 0;
    while let Some(p) = sig[from..].find(id) {
        let at = from + p;
        let before_ok = at == 0 || !is_word(sig.as_bytes()[at - 1]);
        let after = sig[at + id.len()..].trim_start();
        if before_ok && after.starts_with(':') && !after.starts_with("::") {
            let ty = after[1..].split([',', ')']).next().unwrap().trim();
            return Some(ty.to_string());
        }
        from = at + id.len();
    }
    None
}

/// One `cuda_launch!` call site: where it is, every kernel it may launch, its argument
/// expressions, and the text of its function up to the launch.
struct Site {
    label: String,
    names: Vec<String>,
    args: Vec<String>,
    body: String,
}

/// Kernel names a launch may use: a literal, a `let name = ...` statement (every literal in it,
/// e.g. the `[O0, O2, O3]` entry points given to `amp_kernel`), or the TC family.
fn site_names(
    name_expr: &str,
    body: &str,
    sigs: &HashMap<String, Vec<String>>,
    site: &str,
) -> Vec<String> {
    let mut names: Vec<String> = if name_expr.starts_with('"') {
        vec![name_expr.trim_matches('"').to_string()]
    } else if name_expr.contains(".kernel(") || name_expr.contains(".phase_kernel(") {
        sigs.keys()
            .filter(|k| k.contains("_tc_"))
            .cloned()
            .collect()
    } else {
        let let_pos = body
            .rfind(&format!("let {name_expr} ="))
            .or_else(|| body.rfind(&format!("let ({name_expr},")))
            .unwrap_or_else(|| panic!("{site}: cannot find the kernel name {name_expr}"));
        let stmt = &body[let_pos..];
        let stmt = &stmt[..stmt.find(";\n").unwrap_or(stmt.len())];
        stmt.split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    names.sort();
    names.dedup();
    assert!(!names.is_empty(), "{site}: no kernel names");
    names
}

/// Launcher sources with comments removed, in [`launcher_files`] order.
fn launcher_sources() -> Vec<String> {
    launcher_files()
        .iter()
        .map(|f| strip_comments(&std::fs::read_to_string(root().join(f)).unwrap()))
        .collect()
}

/// Every `cuda_launch!` call site of the launcher files.
fn launch_sites(files: &[String], sigs: &HashMap<String, Vec<String>>) -> Vec<Site> {
    let mut sites = Vec::new();
    for (file, src) in launcher_files().into_iter().zip(files) {
        let b = src.as_bytes();
        for (pos, _) in src.match_indices("cuda_launch!(") {
            if src[..pos].ends_with("macro_rules! ") {
                continue;
            }
            let open = pos + "cuda_launch!".len();
            let parts = split_top(&src[open + 1..close_of(b, open)]);
            let fn_start = src[..pos].rfind("fn ").expect("launch inside a function");
            let body = src[fn_start..pos].to_string();
            let label = format!("{file}:{}", src[..pos].lines().count());
            sites.push(Site {
                names: site_names(&parts[1], &body, sigs, &label),
                label,
                args: parts[3..].to_vec(),
                body,
            });
        }
    }
    sites
}

#[test]
fn every_launch_matches_its_kernel_signature() {
    let sigs = kernel_signatures();
    assert!(sigs.len() > 40, "parsed only {} kernels", sigs.len());
    let files = launcher_sources();
    let fields = field_types(&files);
    let mut checked = 0;
    let mut errors = Vec::new();
    for site in launch_sites(&files, &sigs) {
        let mut got = Vec::new();
        for a in &site.args {
            let ty = ident_type(a, &site.body, &fields, 0);
            match ty.as_deref().and_then(rust_class) {
                Some(c) => got.push(c),
                None => errors.push(format!(
                    "{}: cannot resolve the type of `{a}` ({ty:?})",
                    site.label
                )),
            }
        }
        for n in &site.names {
            let Some(want) = sigs.get(n) else {
                errors.push(format!(
                    "{}: no kernel named {n} in kernels/*.cu",
                    site.label
                ));
                continue;
            };
            if *want != got {
                errors.push(format!(
                    "{}: {n} takes {want:?}, the launcher passes {got:?} ({:?})",
                    site.label, site.args
                ));
            }
            checked += 1;
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(
        checked >= 70,
        "only {checked} (launch, kernel) pairs checked"
    );
}

/// The O2 kernel a precision variant belongs to (`bn_apply_o3` -> `bn_apply`); itself otherwise.
fn variant_base(name: &str) -> &str {
    name.strip_suffix("_o0")
        .or_else(|| name.strip_suffix("_o3"))
        .unwrap_or(name)
}

/// Only pointee types may differ between a kernel's precision levels: the launcher passes the same
/// argument list to whichever entry point `amp` picks, so the ABI classes must be identical.
#[test]
fn precision_variants_keep_their_base_abi() {
    let sigs = kernel_signatures();
    let mut variants = 0;
    for (name, classes) in &sigs {
        let base = variant_base(name);
        if base == name {
            continue;
        }
        let base_classes = sigs
            .get(base)
            .unwrap_or_else(|| panic!("{name} has no O2 entry point {base}"));
        assert_eq!(classes, base_classes, "{name} vs {base}");
        variants += 1;
    }
    assert!(variants >= 29, "only {variants} precision variants parsed");
}

/// The launchers (src/ops/<op>/cuda.rs) are where the precision level is applied: a launch of a kernel
/// that has precision variants must be able to launch all of them, and every variant must be
/// launched somewhere. Otherwise an O0 step would silently feed fp32 tensors to an fp16 kernel.
#[test]
fn launchers_cover_every_precision_variant() {
    let sigs = kernel_signatures();
    let files = launcher_sources();
    let sites: Vec<Site> = launch_sites(&files, &sigs);
    let family =
        |base: &str| -> Vec<&String> { sigs.keys().filter(|k| variant_base(k) == base).collect() };
    for site in &sites {
        for n in &site.names {
            for member in family(variant_base(n)) {
                assert!(
                    site.names.contains(member),
                    "{}: launches {n} but can never launch {member} ({:?})",
                    site.label,
                    site.names
                );
            }
        }
    }
    for name in sigs.keys().filter(|k| variant_base(k) != k.as_str()) {
        assert!(
            sites.iter().any(|s| s.names.contains(name)),
            "no launcher in src/ops/*/cuda.rs launches {name}"
        );
    }
}

/// `amp_kernel([o0, o2, o3])` lists are positional: a swapped pair would launch, say, the O3 BN
/// kernel on fp32 statistics with no ABI difference to catch it. Each list must read
/// `[base_o0, base, base_o3]`, with `base` in the O3 slot exactly when no `base_o3` exists.
#[test]
fn amp_kernel_lists_are_in_level_order() {
    let sigs = kernel_signatures();
    let files = launcher_sources();
    let mut lists = 0;
    for src in &files {
        let b = src.as_bytes();
        for (pos, _) in src.match_indices("amp_kernel([") {
            let open = pos + "amp_kernel(".len();
            let items: Vec<String> = split_top(&src[open + 1..close_of(b, open)])
                .iter()
                .map(|i| i.trim_matches('"').to_string())
                .collect();
            assert_eq!(items.len(), 3, "amp_kernel takes [O0, O2, O3]: {items:?}");
            let base = &items[1];
            assert_eq!(
                variant_base(base),
                base,
                "O2 slot must be the unsuffixed name: {items:?}"
            );
            assert_eq!(items[0], format!("{base}_o0"), "O0 slot: {items:?}");
            let o3 = format!("{base}_o3");
            let want_o3 = if sigs.contains_key(&o3) { &o3 } else { base };
            assert_eq!(&items[2], want_o3, "O3 slot: {items:?}");
            lists += 1;
        }
    }
    assert!(lists >= 24, "only {lists} amp_kernel lists found");
}

/// The test's own parser, on a deliberately wrong launcher.
#[test]
fn a_mismatch_is_detected() {
    let body = "fn f(&self, x: DevPtr, count: usize) -> Result<()> {\n let (n, c) = (count as u64, 3i32);\n";
    let fields = HashMap::new();
    let classes: Vec<Option<String>> = ["x", "n", "c"]
        .iter()
        .map(|a| {
            ident_type(a, body, &fields, 0)
                .as_deref()
                .and_then(rust_class)
        })
        .collect();
    assert_eq!(
        classes,
        vec![Some("8".into()), Some("8".into()), Some("4i".into())]
    );
    let want: Vec<String> = split_top("const __half* x, int count, int c")
        .iter()
        .map(|p| c_class(p))
        .collect();
    let got: Vec<String> = classes.into_iter().map(Option::unwrap).collect();
    assert_ne!(want, got);
}

/// (field, ABI class) of C `struct name { ... };` in `src`.
fn c_struct_fields(src: &str, name: &str) -> Vec<(String, String)> {
    let src = strip_comments(src);
    let start = src.find(&format!("struct {name} {{")).expect("C struct") + name.len() + 8;
    let body = &src[start..start + src[start..].find("};").unwrap()];
    let mut out = Vec::new();
    for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
        let parts: Vec<&str> = decl.split(',').map(str::trim).collect();
        let class = c_class(parts[0]);
        let first = parts[0]
            .split_whitespace()
            .last()
            .unwrap()
            .trim_start_matches('*');
        out.push((first.to_string(), class.clone()));
        for p in &parts[1..] {
            out.push((p.to_string(), class.clone()));
        }
    }
    out
}

/// (field, ABI class) of Rust `pub struct name { pub f: T, ... }` in `src`.
fn rust_struct_fields(src: &str, name: &str) -> Vec<(String, String)> {
    let src = strip_comments(src);
    let start = src
        .find(&format!("pub struct {name} {{"))
        .expect("Rust struct");
    let body = &src[start..start + src[start..].find('}').unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.trim_end_matches(',').split_once(':'))
        .map(|(f, t)| {
            let class = rust_class(t).unwrap_or_else(|| panic!("{name}.{f}: type {t}"));
            (f.trim().to_string(), class)
        })
        .collect()
}

/// The by-value parameter blocks must agree field for field (order, width), or every field after
/// the first difference is read from the wrong offset.
#[test]
fn param_structs_mirror_the_c_structs() {
    let read = |f: &str| std::fs::read_to_string(root().join(f)).unwrap();
    for (name, c_file, rust_file) in [
        ("ConvParams", "kernels/common.cuh", "src/ops/conv/tiles.rs"),
        ("PoolParams", "kernels/pool.cu", "src/ops/pool/cuda.rs"),
        ("RmspropParams", "kernels/optimizer.cu", "src/optim/cuda.rs"),
    ] {
        let c = c_struct_fields(&read(c_file), name);
        let r = rust_struct_fields(&read(rust_file), name);
        assert!(c.len() >= 10, "{name}: parsed {c:?}");
        assert_eq!(c, r, "{name}: C (left) and Rust (right) layouts differ");
    }
}
