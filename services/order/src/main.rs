use std::process::ExitCode;

fn main() -> ExitCode {
    shop_order::BINARY.main(shop_order::Config::from_env, shop_order::run)
}
