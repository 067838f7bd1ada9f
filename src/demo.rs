//! `qrgate demo`: placeholder until the simulator lands.
pub async fn run() -> anyhow::Result<()> {
    anyhow::bail!("demo not built yet")
}
