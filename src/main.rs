fn main() {
    std::process::exit(xent::cli::main());
}
