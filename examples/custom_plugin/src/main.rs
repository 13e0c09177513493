//! A Wardroom server with the `shout_guard` plugin: the few lines an
//! application needs to run the server with a filter of its own.
//!
//! ```sh
//! cargo run -p wardroom-example-custom-plugin -- examples/custom_plugin/config.toml
//! ```

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "examples/custom_plugin/config.toml".to_owned());
    let server = wardroom::Server::builder().register(wardroom_example_custom_plugin::register).load_file(path)?;
    let listener = tokio::net::TcpListener::bind(server.config().server.bind).await?;
    println!("listening on {}", listener.local_addr()?);
    server
        .run(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
