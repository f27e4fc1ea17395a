use std::process::ExitCode;

fn main() -> ExitCode {
    shop_product::BINARY.main(shop_product::Config::from_env, shop_product::run)
}
