//! Every Kubernetes manifest shown in the documentation's Markdown (```yaml blocks with an
//! `apiVersion`) is accepted by the real kube-apiserver: server-side apply with dry run and
//! strict field validation, so a misspelt field fails this test instead of a reader. The
//! claim templates under `docs/examples/` are applied by `controller/tests/real_apiserver.rs`.

mod common;

use std::path::{Path, PathBuf};

use common::{binaries_or_skip, init_tracing};
use serde_json::Value;
use tessera_chart_tests::{Apply, apply, parse_documents};
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions, K8sVersion};

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            markdown_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "md") {
            out.push(path);
        }
    }
}

/// The ```yaml blocks of a Markdown file, with the line each starts on.
fn yaml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (number, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```yaml") => {
                current = Some((number + 1, String::new()))
            }
            Some(_) if line.trim_start().starts_with("```") => blocks.extend(current.take()),
            Some((_, block)) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn yaml_blocks_are_found_with_their_lines() {
    let text = "intro\n```yaml\na: 1\n```\n```sh\nx\n```\n```yaml\nb: 2\n```\n";
    assert_eq!(
        yaml_blocks(text),
        vec![(2, "a: 1\n".to_owned()), (8, "b: 2\n".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_manifests_are_accepted_by_the_apiserver() {
    init_tracing();
    let version = K8sVersion::newest();
    let Some(binaries) = binaries_or_skip(version, "docs-manifests") else {
        return;
    };
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    let mut files = Vec::new();
    markdown_files(&docs, &mut files);
    files.sort();
    let mut manifests: Vec<(String, Value)> = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("reading docs");
        for (line, block) in yaml_blocks(&text) {
            let documents = parse_documents(&block).unwrap_or_else(|e| {
                panic!(
                    "{}:{line}: a yaml block that does not parse: {e}",
                    file.display()
                )
            });
            for document in documents
                .into_iter()
                .filter(|d| d.get("apiVersion").is_some())
            {
                manifests.push((format!("{}:{line}", file.display()), document));
            }
        }
    }
    assert!(
        manifests.len() >= 3,
        "the docs show manifests; found only {}",
        manifests.len()
    );

    let state = common::StateDir::new("docs-manifests");
    let mut options = ControlPlaneOptions::new(version, state.path());
    options.binaries = Some(binaries);
    let cp = ControlPlane::start(options).await.expect("control plane");
    for (place, manifest) in &manifests {
        if let Err(e) = apply(&cp.client(), std::slice::from_ref(manifest), Apply::DryRun).await {
            panic!("{place}: the API server refuses this documented manifest: {e}\n{manifest:#}");
        }
    }
    eprintln!("{} documented manifests accepted", manifests.len());
}
