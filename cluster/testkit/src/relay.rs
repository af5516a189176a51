use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Forwards every connection made to [`Relay::address`] to an upstream
/// server. After [`Relay::freeze`], every connection it carried until then
/// stays open but moves no more bytes, as across a partition or to a host
/// that lost power, while new connections work. Stops when dropped.
pub struct Relay {
    address: SocketAddr,
    accepted: Arc<AtomicU64>,
    /// Connections numbered below this are frozen.
    frozen_below: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on a free port of `host` (a loopback address, or an address
    /// of an interface the test made) and forwards to `upstream`.
    pub async fn start(host: IpAddr, upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind((host, 0)).await.expect("bind the relay");
        let address = listener.local_addr().expect("the relay's address");
        let accepted = Arc::new(AtomicU64::new(0));
        let (frozen_below, frozen) = watch::channel(0u64);
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Ok(mut outbound) = TcpStream::connect(upstream).await else { continue };
                let number = counter.fetch_add(1, Ordering::SeqCst);
                let mut frozen = frozen.clone();
                connections.spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = async { frozen.wait_for(|below| number < *below).await.is_ok() } => {
                            // Both sockets stay open, silent, until the relay is dropped.
                            std::future::pending::<()>().await
                        }
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Relay { address, accepted, frozen_below, task }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Silences every connection accepted so far.
    pub fn freeze(&self) {
        self.frozen_below.send_replace(self.accepted.load(Ordering::SeqCst));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
