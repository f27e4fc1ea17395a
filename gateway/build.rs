include!("../link/link_args.rs");

fn main() {
    link_binaries("../link/symbol-order/gateway.txt");
}
