//! Fingerprint injectivity: a request against a copy with bytes, values or body chunks
//! moved between fields (what a missing length or count prefix would merge), and against an
//! unrelated request.
#![no_main]
use arbitrary::Arbitrary;
use idem::testing::fuzz_props::{fingerprint_pair, shifted, Request, Shift};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Req {
    method: Vec<u8>,
    path: Vec<u8>,
    query: Vec<u8>,
    headers: Vec<(String, Vec<Vec<u8>>)>,
    body: Vec<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
enum S {
    Bytes(u8, u8),
    Value(u8),
    Rechunk(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    a: Req,
    shifts: Vec<S>,
    b: Req,
}

fn req(r: Req) -> Request {
    Request {
        method: r.method,
        path: r.path,
        query: r.query,
        headers: r.headers,
        body: r.body,
    }
}

fuzz_target!(|input: Input| {
    let shifts: Vec<Shift> = input
        .shifts
        .iter()
        .map(|s| match *s {
            S::Bytes(field, n) => Shift::Bytes {
                field: field as usize,
                n: n as usize,
            },
            S::Value(header) => Shift::Value {
                header: header as usize,
            },
            S::Rechunk(size) => Shift::Rechunk {
                size: size as usize,
            },
        })
        .collect();
    let a = req(input.a);
    fingerprint_pair(&a, &shifted(&a, &shifts));
    fingerprint_pair(&a, &req(input.b));
});
