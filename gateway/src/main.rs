use std::process::ExitCode;

fn main() -> ExitCode {
    shop_gateway::BINARY.main(shop_gateway::Config::from_env, shop_gateway::run)
}
