//! What one phase of a benchmark cost the API server: requests by verb and resource, CPU per
//! server process, and a side-by-side table of phases.

use std::time::Duration;

use super::{cpu_by_process, print_table};

/// Requests the API server has served so far, by `VERB resource[/subresource]`, read from its
/// `apiserver_request_total` counter (every client's requests, controllers' included). Two
/// readings subtracted with [`request_delta`] say what one phase of a benchmark cost in requests.
pub async fn request_counts(
    client: &kube::Client,
) -> Result<std::collections::BTreeMap<String, u64>, kube::Error> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let text = client.request_text(req).await?;
    Ok(parse_request_counts(&text))
}

/// The `apiserver_request_total` series of a Prometheus text page, summed by verb and resource.
fn parse_request_counts(text: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"'))
                .unwrap_or("")
        };
        let mut key = format!("{} {}", label("verb"), label("resource"));
        if !label("subresource").is_empty() {
            key = format!("{key}/{}", label("subresource"));
        }
        let n = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        *out.entry(key).or_insert(0) += n;
    }
    out
}

/// `after - before`, keeping only the series that grew.
pub fn request_delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// What the API server did during one phase of a benchmark: requests served (every client,
/// controllers included) and CPU per server process.
#[derive(Debug, Default)]
pub struct Cost {
    pub requests: std::collections::BTreeMap<String, u64>,
    pub cpu: std::collections::BTreeMap<String, Duration>,
}

impl Cost {
    /// CPU of all the server processes together.
    pub fn server_cpu(&self) -> Duration {
        self.cpu.values().sum()
    }
}

/// A reading of the server's request counters and CPU at the start of a phase.
#[derive(Debug)]
pub struct Mark {
    requests: std::collections::BTreeMap<String, u64>,
    per_process: std::collections::BTreeMap<String, Duration>,
}

impl Mark {
    /// Reads the counters of the API server behind `client` and the CPU of `server`'s processes.
    pub async fn take(client: &kube::Client, server: &[u32]) -> Mark {
        Mark {
            requests: request_counts(client)
                .await
                .unwrap_or_else(|e| panic!("API server metrics: {e}")),
            per_process: cpu_by_process(server),
        }
    }

    /// What the server did since this mark.
    pub async fn since(&self, client: &kube::Client, server: &[u32]) -> Cost {
        let now = request_counts(client)
            .await
            .unwrap_or_else(|e| panic!("API server metrics: {e}"));
        let cpu = cpu_by_process(server)
            .into_iter()
            .map(|(p, c)| {
                let d = c.saturating_sub(self.per_process.get(&p).copied().unwrap_or_default());
                (p, d)
            })
            .collect();
        Cost {
            requests: request_delta(&self.requests, &now),
            cpu,
        }
    }
}

/// Prints the requests and server CPU of phases side by side (one column per `(name, cost)`).
pub fn print_costs(title: &str, sides: &[(&str, &Cost)]) {
    let mut keys: Vec<&String> = sides.iter().flat_map(|(_, c)| c.requests.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut header = vec!["request"];
    header.extend(sides.iter().map(|(n, _)| *n));
    let mut rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let mut row = vec![(*k).clone()];
            row.extend(
                sides
                    .iter()
                    .map(|(_, c)| c.requests.get(*k).copied().unwrap_or(0).to_string()),
            );
            row
        })
        .collect();
    let mut total = vec!["total".to_string()];
    total.extend(
        sides
            .iter()
            .map(|(_, c)| c.requests.values().sum::<u64>().to_string()),
    );
    rows.push(total);
    let mut procs: Vec<&String> = sides.iter().flat_map(|(_, c)| c.cpu.keys()).collect();
    procs.sort();
    procs.dedup();
    for p in procs {
        let mut row = vec![format!("CPU: {p}")];
        row.extend(
            sides
                .iter()
                .map(|(_, c)| format!("{:.2} s", c.cpu.get(p).copied().unwrap_or_default().as_secs_f64())),
        );
        rows.push(row);
    }
    println!();
    println!("{title}");
    print_table(&header, &rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counts_sum_by_verb_and_resource() {
        let page = concat!(
            "# TYPE apiserver_request_total counter\n",
            "apiserver_request_total{code=\"201\",component=\"apiserver\",group=\"\",resource=\"configmaps\",scope=\"namespace\",subresource=\"\",verb=\"POST\",version=\"v1\"} 5\n",
            "apiserver_request_total{code=\"409\",component=\"apiserver\",group=\"\",resource=\"configmaps\",scope=\"namespace\",subresource=\"\",verb=\"POST\",version=\"v1\"} 2\n",
            "apiserver_request_total{code=\"200\",component=\"apiserver\",group=\"apps\",resource=\"deployments\",scope=\"namespace\",subresource=\"status\",verb=\"PUT\",version=\"v1\"} 3\n",
            "apiserver_request_duration_seconds_count{verb=\"POST\"} 9\n",
        );
        let counts = parse_request_counts(page);
        assert_eq!(counts.get("POST configmaps"), Some(&7));
        assert_eq!(counts.get("PUT deployments/status"), Some(&3));
        assert_eq!(counts.len(), 2);
        let later = parse_request_counts(&page.replace("} 5", "} 9"));
        let d = request_delta(&counts, &later);
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            vec![("POST configmaps".to_string(), 4)]
        );
    }
}
