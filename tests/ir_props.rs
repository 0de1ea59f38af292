//! Property tests of the IR's patch invariants: a successful patch leaves a verified graph
//! whose use-def maps equal ones rebuilt from scratch; a rejected patch changes nothing.
use proptest::prelude::*;
use smoe_opt::ir::builder::{node, tensor_f32, Dim, ModelBuilder};
use smoe_opt::ir::{Graph, Initializer, NodeId, Patch};
use smoe_opt::onnx::proto::tensor_proto::DataType;
use smoe_opt::Model;

/// A chain x -> Relu -> ... -> y of `n` nodes with side branches joined by Add.
fn chain(n: usize) -> Model {
    let mut b = ModelBuilder::new("chain")
        .input("x", DataType::Float, &[Dim::Sym("n".into()), 4.into()])
        .output("y", DataType::Float, &[Dim::Sym("n".into()), 4.into()])
        .init(tensor_f32("c", &[4], &[1.0; 4]));
    let mut prev = "x".to_string();
    for i in 0..n {
        let out = if i + 1 == n {
            "y".to_string()
        } else {
            format!("v{i}")
        };
        let op = if i % 3 == 2 { "Add" } else { "Relu" };
        let inputs: Vec<&str> = if op == "Add" {
            vec![&prev, "c"]
        } else {
            vec![&prev]
        };
        b = b.node(node(op, &format!("n{i}"), &inputs, &[&out], vec![]));
        prev = out;
    }
    let p = b.build();
    Model::from_proto(p, std::path::Path::new("."), None).unwrap()
}

fn assert_consistent(g: &Graph) {
    g.verify().unwrap();
    let mut fresh = g.clone();
    // Rebuild the maps from the proto to compare with the incrementally kept ones.
    fresh = Graph::from_proto(fresh.to_proto(), Default::default()).unwrap();
    let (p1, c1) = g.maps_snapshot();
    let (p2, c2) = fresh.maps_snapshot();
    // Node ids differ after a rebuild; compare by producer/consumer node names instead.
    let names = |g: &Graph, ids: &[NodeId]| -> Vec<String> {
        ids.iter()
            .map(|&i| g.node(i).unwrap().name.clone().unwrap())
            .collect()
    };
    let p1: Vec<_> = p1
        .iter()
        .map(|(v, id)| (v.clone(), names(g, &[*id])))
        .collect();
    let p2: Vec<_> = p2
        .iter()
        .map(|(v, id)| (v.clone(), names(&fresh, &[*id])))
        .collect();
    assert_eq!(p1, p2);
    let c1: Vec<_> = c1
        .iter()
        .map(|(v, ids)| (v.clone(), names(g, ids)))
        .collect();
    let c2: Vec<_> = c2
        .iter()
        .map(|(v, ids)| (v.clone(), names(&fresh, ids)))
        .collect();
    assert_eq!(c1, c2);
}

#[derive(Debug, Clone)]
enum Edit {
    /// Replace node i by Identity(input) -> same output (always valid).
    Bypass(usize),
    /// Remove node i without replacement (valid only if nothing uses its output).
    Remove(usize),
    /// Insert Neg after node i and redirect its consumers.
    InsertAfter(usize),
    /// Add an initializer, and optionally a node reading an undefined value.
    Dangling(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0..40usize).prop_map(Edit::Bypass),
        (0..40usize).prop_map(Edit::Remove),
        (0..40usize).prop_map(Edit::InsertAfter),
        (0..40usize).prop_map(Edit::Dangling),
    ]
}

fn build_patch(g: &Graph, e: &Edit, step: usize) -> Patch {
    let ids: Vec<NodeId> = g.nodes().map(|(id, _)| id).collect();
    let mut p = Patch::new(format!("edit{step}"));
    match *e {
        Edit::Bypass(i) => {
            let id = ids[i % ids.len()];
            let n = g.node(id).unwrap().clone();
            p.remove_node(id);
            p.add_node(node(
                "Identity",
                &format!("id{step}"),
                &[&n.input[0]],
                &[&n.output[0]],
                vec![],
            ));
        }
        Edit::Remove(i) => {
            p.remove_node(ids[i % ids.len()]);
        }
        Edit::InsertAfter(i) => {
            let id = ids[i % ids.len()];
            let out = g.node(id).unwrap().output[0].clone();
            let new = format!("neg{step}");
            if g.is_output(&out) {
                return p;
            }
            p.replace_uses(out.clone(), new.clone());
            p.add_node(node("Neg", &format!("neg{step}"), &[&out], &[&new], vec![]));
        }
        Edit::Dangling(i) => {
            p.add_initializer(Initializer::inline(tensor_f32(
                &format!("k{step}"),
                &[1],
                &[0.0],
            )));
            if i % 2 == 0 {
                p.add_node(node(
                    "Relu",
                    &format!("bad{step}"),
                    &["undefined_value"],
                    &[&format!("b{step}")],
                    vec![],
                ));
            }
        }
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn patches_keep_invariants(n in 1usize..12, edits in proptest::collection::vec(edit(), 1..8)) {
        let mut g = chain(n).graph;
        assert_consistent(&g);
        for (step, e) in edits.iter().enumerate() {
            if g.node_count() == 0 { break; }
            let before = g.to_proto();
            let patch = build_patch(&g, e, step);
            match g.apply(patch) {
                Ok(()) => assert_consistent(&g),
                Err(err) => {
                    // Rejected: the graph is exactly as before, and the error names the patch.
                    prop_assert_eq!(g.to_proto(), before);
                    let label = format!("edit{}", step);
                    prop_assert!(err.to_string().contains(&label), "{}", err);
                }
            }
        }
    }
}

#[test]
fn removing_a_used_value_is_rejected() {
    let mut g = chain(3).graph;
    let first = g.nodes().next().unwrap().0;
    let mut p = Patch::new("drop-first");
    p.remove_node(first);
    let err = g.apply(p).unwrap_err().to_string();
    assert!(err.contains("drop-first") && err.contains("v0"), "{err}");
    g.verify().unwrap();
}

#[test]
fn added_nodes_are_placed_topologically() {
    let mut g = chain(3).graph;
    // Replace n1 (v0 -> v1) with two nodes added in reverse dependency order.
    let n1 = g.nodes().nth(1).unwrap().0;
    let mut p = Patch::new("split");
    p.remove_node(n1);
    p.add_node(node("Neg", "second", &["t"], &["v1"], vec![]));
    p.add_node(node("Neg", "first", &["v0"], &["t"], vec![]));
    g.apply(p).unwrap();
    let order: Vec<String> = g.nodes().map(|(_, n)| n.name.clone().unwrap()).collect();
    assert_eq!(order, ["n0", "first", "second", "n2"]);
    assert_eq!(g.consumers("t").len(), 1);
    assert_eq!(g.producer("v1"), g.nodes().nth(2).map(|(id, _)| id));
}

#[test]
fn graph_outputs_cannot_be_renamed() {
    let mut g = chain(2).graph;
    let mut p = Patch::new("rename");
    p.replace_uses("y", "z");
    assert!(g.apply(p).is_err());
}

#[test]
fn subgraph_captures_count_as_uses() {
    use smoe_opt::ir::builder::attr_graph;
    use smoe_opt::onnx::proto::GraphProto;
    // An If whose branches read the outer value `v` implicitly.
    let branch = |name: &str| GraphProto {
        name: Some(name.into()),
        node: vec![node(
            "Identity",
            name,
            &["v"],
            &[&format!("{name}_out")],
            vec![],
        )],
        output: vec![smoe_opt::ir::builder::value_info(
            &format!("{name}_out"),
            DataType::Float,
            &[4.into()],
        )],
        ..Default::default()
    };
    let p = ModelBuilder::new("if")
        .input("x", DataType::Float, &[4.into()])
        .input("cond", DataType::Bool, &[])
        .output("y", DataType::Float, &[4.into()])
        .node(node("Relu", "r", &["x"], &["v"], vec![]))
        .node(node(
            "If",
            "if",
            &["cond"],
            &["y"],
            vec![
                attr_graph("then_branch", branch("t")),
                attr_graph("else_branch", branch("e")),
            ],
        ))
        .build();
    let mut g = Model::from_proto(p, std::path::Path::new("."), None)
        .unwrap()
        .graph;
    g.verify().unwrap();
    let relu = g.producer("v").unwrap();
    assert_eq!(g.consumers("v").len(), 1);
    let mut patch = Patch::new("drop-relu");
    patch.remove_node(relu);
    assert!(
        g.apply(patch).is_err(),
        "removing a value a subgraph captures must be rejected"
    );
}
