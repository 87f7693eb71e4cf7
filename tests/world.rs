//! The shapes world: captions, rendering, the ground-truth rater's properties, and the rater
//! against an independent NumPy implementation (`tests/fixtures/gen_rater.py`).

mod common;

use diffalign::rng::Rng;
use diffalign::shapes::{preference_probability, rate, Colour, Prompt, Scene, Shape};

fn floats(img: &image::RgbImage) -> Vec<f32> {
    img.as_raw().iter().map(|&b| f32::from(b) / 255.0).collect()
}

#[test]
fn captions_round_trip_and_bad_captions_are_errors() {
    let all = Prompt::all();
    assert_eq!(all.len(), 3 * 6 * 5);
    for p in &all {
        assert_eq!(p.to_string().parse::<Prompt>().unwrap(), *p);
    }
    assert_eq!(
        "A  Red circle on a BLUE background".parse::<Prompt>().unwrap(),
        Prompt {
            shape: Shape::Circle,
            colour: Colour::Red,
            background: Colour::Blue
        }
    );
    for bad in [
        "a red circle",
        "a red circle on a red background",
        "a pink circle on a blue background",
        "",
    ] {
        let err = bad.parse::<Prompt>().unwrap_err().to_string();
        assert!(err.contains("shapes-world caption"), "{bad:?}: {err}");
    }
    let mut rng = Rng::new(3);
    for p in all.iter().take(20) {
        let q = p.perturbed(&mut rng);
        assert_ne!(q, *p);
        assert_ne!(q.colour, q.background);
        assert_eq!(q.shape, p.shape);
    }
}

#[test]
fn rendering_is_deterministic_and_draws_the_caption() {
    let prompt: Prompt = "a yellow square on a purple background".parse().unwrap();
    let scene = Scene::random(prompt, &mut Rng::new(9));
    let a = scene.render(32);
    assert_eq!(a, Scene::random(prompt, &mut Rng::new(9)).render(32));
    let at = |x: f64, y: f64| a.get_pixel((x * 32.0) as u32, (y * 32.0) as u32).0;
    assert_eq!(at(scene.cx, scene.cy), [240, 210, 40]);
    // A point outside the square's extent is background.
    let outside = if scene.cx > 0.5 { 0.01 } else { 0.99 };
    assert_eq!(at(outside, 0.01), [150, 60, 190]);
}

#[test]
fn rater_prefers_the_true_caption_and_large_centred_shapes() {
    let mut rng = Rng::new(11);
    let mut wins = 0;
    let trials = 200;
    for _ in 0..trials {
        let p = Prompt::random(&mut rng);
        let scene = Scene::random(p, &mut rng);
        let img = floats(&scene.render(32));
        let truth = rate(&img, 32, 32, &p).unwrap().score;
        let other_shape = Shape::ALL.into_iter().find(|s| *s != p.shape).unwrap();
        let wrong = [
            p.perturbed(&mut rng),
            Prompt {
                shape: other_shape,
                ..p
            },
        ];
        if wrong.iter().all(|w| rate(&img, 32, 32, w).unwrap().score < truth) {
            wins += 1;
        }
    }
    assert!(
        wins as f64 >= 0.95 * trials as f64,
        "true caption ranked first {wins}/{trials}"
    );

    let p: Prompt = "a red circle on a blue background".parse().unwrap();
    let big = Scene {
        prompt: p,
        cx: 0.5,
        cy: 0.5,
        half: 0.3,
    };
    let small = Scene {
        prompt: p,
        cx: 0.2,
        cy: 0.2,
        half: 0.12,
    };
    let (rb, rs) = (
        rate(&floats(&big.render(32)), 32, 32, &p).unwrap(),
        rate(&floats(&small.render(32)), 32, 32, &p).unwrap(),
    );
    assert!(rb.taste > rs.taste && rb.score > rs.score, "{rb:?} vs {rs:?}");
    // A blank background image has no shape and scores low.
    let blank = Scene {
        prompt: p,
        cx: 0.5,
        cy: 0.5,
        half: 0.0,
    };
    let rz = rate(&floats(&blank.render(32)), 32, 32, &p).unwrap();
    assert!(rz.colour == 0.0 && rz.score < rs.score);
    assert!(rate(&[0.0; 10], 32, 32, &p).is_err());
}

#[test]
fn bradley_terry_probability_is_a_sigmoid_of_the_gap() {
    assert!((preference_probability(0.5, 0.5, 0.05) - 0.5).abs() < 1e-12);
    let p = preference_probability(0.6, 0.5, 0.05);
    assert!((p - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-12);
    assert!((p + preference_probability(0.5, 0.6, 0.05) - 1.0).abs() < 1e-12);
}

#[test]
fn embedded_reward_prefers_the_true_caption_of_rendered_scenes() {
    use diffalign::reward::{load_reward, RewardKind};
    let tmp = tempfile::tempdir().unwrap();
    let dir = diffalign::shapes::assets::shapes_reward_dir(tmp.path()).unwrap();
    let reward = load_reward(RewardKind::ClipScore, &dir, &Default::default()).unwrap();
    let mut rng = Rng::new(21);
    // Pairwise: the true caption against a wrong colour or background, and against a wrong shape.
    let (mut colour_wins, mut shape_wins, trials) = (0, 0, 100);
    for _ in 0..trials {
        let p = Prompt::random(&mut rng);
        let img = Scene::random(p, &mut rng).render(32);
        let t = candle_core::Tensor::from_vec(floats(&img), (32, 32, 3), &candle_core::Device::Cpu)
            .unwrap()
            .permute((2, 0, 1))
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let score = |q: &Prompt| reward.score(&t, &q.to_string()).unwrap().to_vec1::<f32>().unwrap()[0];
        let truth = score(&p);
        let other_shape =
            Shape::ALL[(Shape::ALL.iter().position(|s| *s == p.shape).unwrap() + 1 + rng.below(2) as usize) % 3];
        colour_wins += usize::from(score(&p.perturbed(&mut rng)) < truth);
        shape_wins += usize::from(
            score(&Prompt {
                shape: other_shape,
                ..p
            }) < truth,
        );
    }
    eprintln!("learned reward: colour/background {colour_wins}/{trials}, shape {shape_wins}/{trials}");
    assert!(
        colour_wins as f64 >= 0.9 * trials as f64,
        "colour/background: {colour_wins}/{trials}"
    );
    assert!(shape_wins as f64 >= 0.7 * trials as f64, "shape: {shape_wins}/{trials}");
}

#[test]
fn rater_matches_independent_numpy_implementation() {
    let path = common::own_fixtures().join("world/rater.safetensors");
    let e = common::load(&path);
    let prompts: Vec<String> = serde_json::from_str(&common::metadata(&path)["prompts"]).unwrap();
    let images = &e["images"];
    let (n, h, w, _) = images.dims4().unwrap();
    assert_eq!(n, prompts.len());
    let want: Vec<Vec<f64>> = ["background", "colour", "shape", "taste", "score"]
        .iter()
        .map(|k| common::f64s(&e[*k]))
        .collect();
    for (i, prompt) in prompts.iter().enumerate() {
        let pixels: Vec<f32> = images.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let r = rate(&pixels, h, w, &prompt.parse().unwrap()).unwrap();
        let got = [r.background, r.colour, r.shape, r.taste, r.score];
        for (k, (g, want)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - want[i]).abs() < 1e-9,
                "image {i} ({prompt}), component {k}: {g} vs {}",
                want[i]
            );
        }
    }
}
