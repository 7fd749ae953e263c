//! `cargo xtask structure`: what the code's shape is, measured (issue 18):
//! the longest non-test functions of every crate, and the dependencies
//! between the agent's top-level modules with their cycles. Parses the
//! sources with `syn`; test code (`#[cfg(test)]` modules, `#[test]`
//! functions, `tests/` and `benches/`) is left out.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use syn::visit::Visit;

/// A function and its length in lines (signature to closing brace).
pub struct Function {
    pub file: PathBuf,
    pub line: usize,
    pub name: String,
    pub lines: usize,
}

fn is_test_attr(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let path = a.path();
        if path.is_ident("test") {
            return true;
        }
        if path.is_ident("cfg") {
            let text = a.meta.to_token_stream_string();
            return text.contains("test");
        }
        false
    })
}

trait MetaText {
    fn to_token_stream_string(&self) -> String;
}

impl MetaText for syn::Meta {
    fn to_token_stream_string(&self) -> String {
        quote::ToTokens::to_token_stream(self).to_string()
    }
}

struct Collector<'a> {
    file: &'a Path,
    /// The file's module path (`["datapath", "sync"]`; empty for the
    /// crate root).
    module: Vec<String>,
    /// Inline (non-test) modules the visitor is in.
    inline_depth: usize,
    /// The enclosing `impl` type or module, for names.
    scope: Vec<String>,
    functions: Vec<Function>,
    /// Paths from the crate root this file's code names.
    refers_to: BTreeSet<Vec<String>>,
}

impl Collector<'_> {
    fn record(&mut self, name: &syn::Ident, span: proc_macro2::Span) {
        let start = span.start().line;
        let end = span.end().line;
        let mut full = self.scope.clone();
        full.push(name.to_string());
        self.functions.push(Function {
            file: self.file.to_owned(),
            line: start,
            name: full.join("::"),
            lines: end + 1 - start,
        });
    }
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_test_attr(&m.attrs) {
            return;
        }
        self.scope.push(m.ident.to_string());
        self.inline_depth += 1;
        syn::visit::visit_item_mod(self, m);
        self.inline_depth -= 1;
        self.scope.pop();
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if is_test_attr(&f.attrs) {
            return;
        }
        self.record(&f.sig.ident, syn::spanned::Spanned::span(f));
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if is_test_attr(&i.attrs) {
            return;
        }
        let ty = quote::ToTokens::to_token_stream(&i.self_ty)
            .to_string()
            .replace(' ', "");
        self.scope.push(ty);
        syn::visit::visit_item_impl(self, i);
        self.scope.pop();
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if is_test_attr(&f.attrs) {
            return;
        }
        self.record(&f.sig.ident, syn::spanned::Spanned::span(f));
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if f.default.is_some() {
            self.record(&f.sig.ident, syn::spanned::Spanned::span(f));
        }
        syn::visit::visit_trait_item_fn(self, f);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.refer(segments);
        syn::visit::visit_path(self, p);
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut paths = Vec::new();
        expand_use(&u.tree, Vec::new(), &mut paths);
        for path in paths {
            self.refer(path);
        }
    }
}

impl Collector<'_> {
    /// Records a path that starts at the crate root or a parent module.
    fn refer(&mut self, mut segments: Vec<String>) {
        let absolute = match segments.first().map(String::as_str) {
            Some("crate") => segments.split_off(1),
            Some("super") => {
                // `super` of the file's module (of an inline module: the
                // file's module itself).
                let mut base = self.module.clone();
                if self.inline_depth == 0 {
                    base.pop();
                }
                while segments.first().map(String::as_str) == Some("super") {
                    segments.remove(0);
                }
                base.extend(segments);
                base
            }
            _ => return,
        };
        self.refers_to.insert(absolute);
    }
}

/// Every full path a `use` tree names.
fn expand_use(t: &syn::UseTree, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    match t {
        syn::UseTree::Path(p) => {
            let mut next = prefix;
            next.push(p.ident.to_string());
            expand_use(&p.tree, next, out);
        }
        syn::UseTree::Name(n) => {
            let mut path = prefix;
            if n.ident != "self" {
                path.push(n.ident.to_string());
            }
            out.push(path);
        }
        syn::UseTree::Rename(r) => {
            let mut path = prefix;
            path.push(r.ident.to_string());
            out.push(path);
        }
        syn::UseTree::Group(g) => g
            .items
            .iter()
            .for_each(|i| expand_use(i, prefix.clone(), out)),
        syn::UseTree::Glob(_) => out.push(prefix),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file of `src` (`datapath/sync.rs` and
/// `datapath/sync/mod.rs`: `["datapath", "sync"]`; `lib.rs`, `main.rs`: the
/// crate root, `[]`).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

pub struct Report {
    pub functions: Vec<Function>,
    /// Module -> the modules it refers to (by the longest module prefix of
    /// each path it names; itself and the crate root left out).
    pub deps: BTreeMap<String, BTreeSet<String>>,
}

impl Report {
    /// The same graph between top-level modules.
    pub fn top_level(&self) -> BTreeMap<String, BTreeSet<String>> {
        let top = |m: &str| m.split("::").next().unwrap_or("").to_owned();
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in &self.deps {
            let entry = out.entry(top(from)).or_default();
            entry.extend(to.iter().map(|t| top(t)).filter(|t| *t != top(from)));
        }
        out
    }
}

pub fn analyse(src: &Path) -> anyhow::Result<Report> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut functions = Vec::new();
    let mut refs: Vec<(Vec<String>, BTreeSet<Vec<String>>)> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
        let ast = syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        let mut c = Collector {
            file: &file,
            module: module_path(src, &file),
            inline_depth: 0,
            scope: Vec::new(),
            functions: Vec::new(),
            refers_to: BTreeSet::new(),
        };
        c.visit_file(&ast);
        functions.extend(c.functions);
        refs.push((c.module, c.refers_to));
    }
    let modules: BTreeSet<Vec<String>> = refs.iter().map(|(m, _)| m.clone()).collect();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, paths) in &refs {
        if module.is_empty() {
            continue;
        }
        let entry = deps.entry(module.join("::")).or_default();
        for path in paths {
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains(p));
            if let Some(target) = target
                && target != *module
            {
                entry.insert(target.join("::"));
            }
        }
    }
    Ok(Report { functions, deps })
}

/// Strongly connected components with more than one module (Tarjan).
pub fn cycles(deps: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        deps: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.deps.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        deps,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in deps.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Prints the report for every crate's `src`.
pub fn structure(most: usize, root: Option<PathBuf>) -> anyhow::Result<()> {
    let root = root.unwrap_or_else(crate::root);
    let mut all = Vec::new();
    for krate in [
        "netlb-common",
        "netlb-ebpf",
        "netlb-agent",
        "netlb-testbed",
        "xtask",
    ] {
        let report = analyse(&root.join(krate).join("src"))?;
        if krate == "netlb-agent" {
            println!("netlb-agent's top-level modules and what they use:");
            let top = report.top_level();
            for (module, targets) in &top {
                let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
                println!("  {module:<10} -> {}", targets.join(", "));
            }
            let top_cycles = cycles(&top);
            let all_cycles = cycles(&report.deps);
            println!(
                "cycles: {} between top-level modules, {} between modules",
                top_cycles.len(),
                all_cycles.len()
            );
            for c in top_cycles.iter().chain(&all_cycles) {
                println!("  {}", c.join(" <-> "));
            }
        }
        all.extend(report.functions);
    }
    all.sort_by_key(|f| std::cmp::Reverse(f.lines));
    let over = all.iter().filter(|f| f.lines > 80).count();
    println!(
        "\n{} non-test functions, {over} over 80 lines; the longest {most}:",
        all.len()
    );
    for f in all.iter().take(most) {
        println!(
            "  {:>4}  {}  ({}:{})",
            f.lines,
            f.name,
            f.file.strip_prefix(&root).unwrap_or(&f.file).display(),
            f.line
        );
    }
    Ok(())
}
