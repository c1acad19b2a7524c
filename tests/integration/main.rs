//! One test binary (each links all of Lance): modules by area.

mod api_errors;
mod api_jobs;
mod crash;
mod fuzz;
mod official_client;
mod reliability;
mod template;
mod worker_runs;

/// Multi-threaded runtime for every test: tasks spawn CPU work.
#[macro_export]
macro_rules! rt_test {
    ($(#[$meta:meta])* async fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async move $body)
        }
    };
}
