use std::process::ExitCode;

fn main() -> ExitCode {
    shop_user::BINARY.main(shop_user::Config::from_env, shop_user::run)
}
