//! `beseda-loadtest`: a load generator that speaks Beseda's real client
//! protocol (WebSocket, protobuf frames) and REST API, paces open-loop,
//! measures end-to-end latency at every receiver with HDR histograms,
//! counts anything lost, duplicated or out of order, and writes a JSON
//! result and an HTML/PNG report. See docs/loadtest.md.

pub mod api;
pub mod client;
pub mod recorder;
pub mod report;
pub mod result;
pub mod run;
pub mod scenario_file;
pub mod scenarios;
pub mod scrape;
pub mod sources;
