//! `strobe demo --nodes N`: a local etcd and N aggregator nodes on loopback, so failover can be watched. Node 1 runs
//! in the demo's process (with the simulated fleet, which dials it and is spread by redirects); nodes 2..N are
//! `strobe aggregator` child processes that can be killed by hand.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use strobe_aggregator::AggregatorConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The etcd and the extra nodes, stopped when dropped.
pub(crate) struct DemoCluster {
    _etcd: Child,
    nodes: Vec<Child>,
    etcd_url: String,
    data: std::path::PathBuf,
}

/// A free loopback port.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

impl DemoCluster {
    /// Starts etcd on loopback and makes `config` node 1 of the cluster.
    pub(crate) async fn start(config: &mut AggregatorConfig) -> Result<Self> {
        let etcd = on_path("etcd").context(
            "strobe demo --nodes needs etcd on the PATH (Debian: apt-get install etcd-server)",
        )?;
        let data = std::env::temp_dir().join(format!("strobe-demo-etcd-{}", std::process::id()));
        // An earlier demo whose process id was this one's left its etcd data (handed-over alerts among it): every
        // demo starts from none.
        std::fs::remove_dir_all(&data).ok();
        std::fs::create_dir_all(&data)?;
        let (client, peer) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client}");
        let child = Command::new(etcd)
            .args(["--name", "demo", "--data-dir"])
            .arg(data.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("demo=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting etcd")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", client))
            .await
            .is_err()
        {
            if tokio::time::Instant::now() > deadline {
                bail!("etcd did not start on {etcd_url}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        config.cluster.etcd = vec![etcd_url.clone()];
        config.cluster.node_id = Some("node-1".to_owned());
        config.cluster.prefix = format!("/strobe-demo-{}/", std::process::id());
        println!("strobe demo: etcd at {etcd_url}");
        Ok(Self {
            _etcd: child,
            nodes: Vec::new(),
            etcd_url,
            data,
        })
    }

    /// Starts nodes 2..=`count` as child processes sharing `config`'s rules and cluster; prints where they are.
    pub(crate) async fn spawn_nodes(
        &mut self,
        count: usize,
        config: &AggregatorConfig,
    ) -> Result<()> {
        let exe = std::env::current_exe().context("finding the strobe binary")?;
        for n in 2..=count {
            let mut command = Command::new(&exe);
            command
                .args([
                    "aggregator",
                    "--grpc-addr",
                    "127.0.0.1:0",
                    "--http-addr",
                    "127.0.0.1:0",
                ])
                .args([
                    "--etcd",
                    &self.etcd_url,
                    "--etcd-prefix",
                    &config.cluster.prefix,
                ])
                .args(["--node-id", &format!("node-{n}")])
                .arg("--state-dir")
                .arg(self.data.join(format!("state-node-{n}")))
                .env("STROBE_LOG", "warn")
                .stdout(Stdio::piped())
                .kill_on_drop(true);
            if let Some(rules) = &config.rules {
                command.arg("--rules").arg(rules);
            }
            let mut child = command.spawn().context("starting a node")?;
            let stdout = child.stdout.take().context("the node's stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .context("the node's address line in time")??
                .context("the node's address line")?;
            let http: Option<SocketAddr> = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("http="))
                .and_then(|a| a.parse().ok());
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            println!(
                "strobe demo: node-{n} at http://{}/ (pid {}; `kill -9 {}` to watch its services move)",
                http.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                child.id().unwrap_or(0),
                child.id().unwrap_or(0),
            );
            self.nodes.push(child);
        }
        Ok(())
    }
}
