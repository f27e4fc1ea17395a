include!("../../link/link_args.rs");

// Migrations are embedded by `sqlx::migrate!`; rebuild when one is added or edited.
fn main() {
    link_binaries("../../link/symbol-order/order.txt");
    println!("cargo:rerun-if-changed=migrations");
}
