//! What the failure tests of several crates share: ports a child process
//! can bind without a race, a `redis-server` child that can be killed and
//! restarted on its port, and a TCP relay whose connections can go silent.
//! A dev-dependency only; nothing here runs in the server.

mod ports;
mod redis_process;
mod relay;

pub use ports::free_port;
pub use redis_process::RedisProcess;
pub use relay::Relay;
