//! Listeners: the API listener a proxyless gRPC client names after the
//! service (`xds:///<service>`), and the one address-bound listener Envoy
//! nodes receive by wildcard.
//!
//! Both hold an `HttpConnectionManager` whose routes come over ADS (RDS)
//! and whose only HTTP filter is the terminal router: gRPC refuses a
//! manager without one, and ISDP's policies need no other filter.

use std::net::SocketAddr;

use envoy_types::pb::envoy::{
    config::{
        core::v3::{Address, SocketAddress, address, socket_address},
        listener::v3::{ApiListener, Filter, FilterChain, Listener, filter},
    },
    extensions::filters::{
        http::router::v3::Router,
        network::http_connection_manager::v3::{
            HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
        },
    },
};

use super::{ENVOY_OUTBOUND, ads, any};

/// What gRPC and Envoy call the router filter.
const ROUTER: &str = "envoy.filters.http.router";
const HCM: &str = "envoy.filters.network.http_connection_manager";

/// The API listener a gRPC client asks for by the service's name; its
/// routes are the `RouteConfiguration` of the same name.
pub fn api(service: &str) -> Listener {
    Listener {
        name: service.to_owned(),
        api_listener: Some(ApiListener {
            api_listener: Some(any(&manager(service))),
        }),
        ..Default::default()
    }
}

/// The listener Envoy nodes bind (`--envoy-outbound-listen`): every
/// service by its `Host`, through the `RouteConfiguration` of the same
/// name. A listener delivered over LDS must be address-bound: Envoy skips
/// API listeners that do not come from its bootstrap.
pub fn envoy_outbound(addr: SocketAddr) -> Listener {
    let address = SocketAddress {
        protocol: socket_address::Protocol::Tcp as i32,
        address: addr.ip().to_string(),
        port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
            addr.port(),
        ))),
        ..Default::default()
    };
    Listener {
        name: ENVOY_OUTBOUND.to_owned(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(address)),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: HCM.to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&manager(
                    ENVOY_OUTBOUND,
                )))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A connection manager routing with the `RouteConfiguration` `routes`,
/// fetched over ADS.
fn manager(routes: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        // Envoy requires a stat prefix; gRPC ignores it.
        stat_prefix: routes.to_owned(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: routes.to_owned(),
        })),
        http_filters: vec![HttpFilter {
            name: ROUTER.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(
                any(&Router::default()),
            )),
            ..Default::default()
        }],
        ..Default::default()
    }
}
