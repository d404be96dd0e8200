//! How `/metrics` answers: OpenMetrics to scrapers that ask for it (Prometheus does), the
//! classic text format (`text/plain; version=0.0.4`) to everyone else (promtool, older agents,
//! `curl`), as the Prometheus Go client does. The metrics are encoded once, as OpenMetrics (all
//! `prometheus-client` writes), and rewritten for classic readers.

/// The content type of an OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of a classic text answer.
pub const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request with this `Accept` header gets OpenMetrics: only when it names
/// `application/openmetrics-text` with a quality at least that of any text format it accepts.
/// No header, `*/*` or `text/plain` get the classic format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    let mut openmetrics = 0.0f32;
    let mut classic = 0.0f32;
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let quality = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(quality),
            "text/plain" | "text/*" | "*/*" => classic = classic.max(quality),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= classic
}

/// Rewrites OpenMetrics text (as `prometheus-client` writes it) in the classic text format:
/// counter families are named with their `_total` suffix in `# HELP` and `# TYPE`, info
/// families become gauges named `…_info`, `# UNIT` and `# EOF` lines go, exemplars are dropped
/// and so are OpenMetrics-only `_created` series.
pub fn to_classic_text(openmetrics: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            match kind.trim() {
                "counter" => {
                    renamed.insert(name.to_owned(), (format!("{name}_total"), "counter"));
                }
                "info" => {
                    renamed.insert(name.to_owned(), (format!("{name}_info"), "gauge"));
                }
                _ => {}
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = renamed.get(name).map_or(name, |(n, _)| n.as_str());
            out.push_str(&format!("# HELP {name} {help}\n"));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            match renamed.get(name) {
                Some((name, kind)) => out.push_str(&format!("# TYPE {name} {kind}\n")),
                None => out.push_str(&format!("# TYPE {name} {kind}\n")),
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let series_name = line.split(['{', ' ']).next().unwrap_or_default();
        if series_name.ends_with("_created")
            && renamed.contains_key(series_name.trim_end_matches("_created"))
        {
            continue;
        }
        out.push_str(without_exemplar(line));
        out.push('\n');
    }
    out
}

/// A sample line without its exemplar (` # {labels} value`), which the classic format lacks.
/// A `#` inside a quoted label value is not one.
fn without_exemplar(line: &str) -> &str {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '#' if !quoted => return line[..i].trim_end(),
            _ => {}
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for_first() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(wants_openmetrics(Some("application/openmetrics-text")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some(
            "text/plain;version=0.0.4,application/openmetrics-text;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(Some("garbage;;q=,")));
    }

    #[test]
    fn counters_and_info_are_renamed_and_openmetrics_only_lines_go() {
        let openmetrics = "\
# HELP tessera_prepare_errors Claims whose preparation failed.
# TYPE tessera_prepare_errors counter
tessera_prepare_errors_total{reason=\"a # b\"} 3 # {trace_id=\"x\"} 1.0
tessera_prepare_errors_created 1.7e9
# HELP tessera_build Build.
# TYPE tessera_build info
tessera_build_info{version=\"0.1.0\"} 1
# HELP tessera_claim_memory_limit_bytes The wall.
# TYPE tessera_claim_memory_limit_bytes gauge
# UNIT tessera_claim_memory_limit_bytes bytes
tessera_claim_memory_limit_bytes{claim=\"c\"} 1073741824
# HELP tessera_prepare_seconds Latency.
# TYPE tessera_prepare_seconds histogram
tessera_prepare_seconds_bucket{le=\"+Inf\"} 1
tessera_prepare_seconds_sum 0.5
tessera_prepare_seconds_count 1
# EOF
";
        let classic = "\
# HELP tessera_prepare_errors_total Claims whose preparation failed.
# TYPE tessera_prepare_errors_total counter
tessera_prepare_errors_total{reason=\"a # b\"} 3
# HELP tessera_build_info Build.
# TYPE tessera_build_info gauge
tessera_build_info{version=\"0.1.0\"} 1
# HELP tessera_claim_memory_limit_bytes The wall.
# TYPE tessera_claim_memory_limit_bytes gauge
tessera_claim_memory_limit_bytes{claim=\"c\"} 1073741824
# HELP tessera_prepare_seconds Latency.
# TYPE tessera_prepare_seconds histogram
tessera_prepare_seconds_bucket{le=\"+Inf\"} 1
tessera_prepare_seconds_sum 0.5
tessera_prepare_seconds_count 1
";
        assert_eq!(to_classic_text(openmetrics), classic);
    }
}
